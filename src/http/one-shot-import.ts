/**
 * The one-shot import of a whole image, shared by PUT /v1/vdis/{vdi}/contents
 * and the xapi alias PUT /import_raw_vdi.
 *
 * An empty body changes nothing. Xen Orchestra sends one, as a probe, before
 * every upload to /import_raw_vdi, and xapi leaves the disk alone; read as
 * "a raw image of no bytes" it would zero the whole disk, and as a vhd or
 * qcow2 it would fail the upload that follows. So an empty body, in any
 * format, answers 200 with an import task that finished at once and says so
 * (`result.unchanged: true`, the generation as it was). It is checked like an
 * upload (the VDI exists and is free) so that it answers what the upload
 * after it would meet.
 */

import type { Readable } from 'node:stream';
import type { Request, Response } from 'express';
import type { VdiStore } from '../storage/vdis.js';
import type { TaskManager } from '../tasks/task-manager.js';
import type { Task } from '../tasks/task-store.js';
import { assertBase, checkBaseRequest } from '../transfer/delta-import.js';
import type { TransferService } from '../transfer/sessions.js';
import { continueNow } from './continue.js';

export interface OneShotDeps {
  transfers: TransferService;
  vdis: VdiStore;
  tasks: TaskManager;
}

export async function importOneShot(
  deps: OneShotDeps,
  req: Request,
  res: Response,
  opts: { vdi: string; format: string; contentLength?: number; base?: string; layDifferencing?: boolean },
): Promise<Task> {
  if (opts.contentLength === 0 || opts.contentLength === undefined) {
    const vdi = deps.vdis.get(opts.vdi);
    deps.vdis.assertWritable(vdi, 'an import');
    deps.vdis.locks.assertFree(vdi.id);
    if (opts.base !== undefined) {
      checkBaseRequest(deps.vdis, opts.format, opts.base);
      await assertBase(deps.vdis, vdi, opts.base);
    }
    let empty = opts.contentLength === 0;
    if (!empty) {
      // A chunked body may still be empty: only its first bytes (or its end) tell.
      continueNow(res);
      empty = await bodyIsEmpty(req);
    }
    if (empty) {
      const task = deps.tasks.start('import', vdi.id, { bytesTotal: 0, format: opts.format });
      return task.succeed({
        vdi: vdi.id,
        format: opts.format,
        generation: vdi.generation,
        bytes_received: 0,
        unchanged: true,
      });
    }
  }
  return deps.transfers.importWhole({
    vdi: opts.vdi,
    format: opts.format,
    body: req,
    contentLength: opts.contentLength,
    beforeBody: () => continueNow(res),
    base: opts.base,
    layDifferencing: opts.layDifferencing,
  });
}

/** Waits for the body's first bytes or its end; bytes that came are put back for the next reader. */
export function bodyIsEmpty(body: Readable): Promise<boolean> {
  return new Promise<boolean>((resolve, reject) => {
    const stop = () => {
      body.off('readable', onReadable);
      body.off('end', onEnd);
      body.off('error', onError);
      body.off('close', onClose);
    };
    const onReadable = () => {
      const chunk = body.read();
      if (chunk === null) return; // the end follows
      stop();
      body.unshift(chunk);
      resolve(false);
    };
    const onEnd = () => {
      stop();
      resolve(true);
    };
    const onError = (err: Error) => {
      stop();
      reject(err);
    };
    // Closed before its end, without an error: the client went away.
    const onClose = () => onError(Object.assign(new Error('aborted'), { code: 'ECONNRESET' }));
    body.on('readable', onReadable);
    body.on('end', onEnd);
    body.on('error', onError);
    body.on('close', onClose);
  });
}
