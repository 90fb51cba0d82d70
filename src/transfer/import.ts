/**
 * One-shot import: a whole image arrives in one request body (Content-Length
 * or chunked), lands in a staging file, and is committed as the VDI's content.
 */
import { randomUUID } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import type { Readable } from 'node:stream';
import { ApiError } from '../errors.js';
import { codecFor } from '../formats/index.js';
import type { Vdi, VdiStore } from '../storage/vdis.js';
import type { RunningTask, TaskManager } from '../tasks/task-manager.js';
import type { Task } from '../tasks/task-store.js';
import { commitStaged } from './commit.js';
import { landStream, tooLargeForVdi } from './land-stream.js';

export interface WholeImport {
  vdi: string;
  format: string;
  body: Readable;
  /** From Content-Length; absent for chunked uploads. */
  contentLength?: number;
}

/**
 * Largest upload accepted for a disk of `virtualSize` in `format`: the disk
 * itself plus room for the container's metadata (qcow2 with 512-byte clusters
 * spends 1/64 on L2 tables and a little on refcounts).
 */
export function uploadLimit(format: string, virtualSize: number): number {
  return format === 'raw' ? virtualSize : virtualSize + Math.ceil(virtualSize / 32) + 16 * 1024 * 1024;
}

export class ImportService {
  constructor(
    private readonly vdis: VdiStore,
    private readonly tasks: TaskManager,
  ) {}

  /** Runs the import to its end; returns the finished task or throws the ApiError it failed with. */
  async importWhole(req: WholeImport): Promise<Task> {
    const vdi = this.vdis.get(req.vdi);
    codecFor(req.format);
    const limit = uploadLimit(req.format, vdi.virtual_size);
    const taskId = randomUUID();
    const release = this.vdis.locks.acquire(vdi.id, `import task ${taskId}`);
    const staged = this.vdis.stagingPath(vdi, `import-${taskId}.${req.format}`);
    const task = this.tasks.start('import', vdi.id, {
      id: taskId,
      bytesTotal: req.contentLength ?? null,
      stagingPath: staged,
    });
    try {
      if (req.contentLength !== undefined && req.contentLength > limit)
        throw tooLargeForVdi(vdi.virtual_size)(req.contentLength);
      await this.land(vdi, staged, req, limit, task);
      const committed = await commitStaged(this.vdis, vdi, staged, req.format, task);
      return task.succeed({
        vdi: vdi.id,
        format: req.format,
        generation: committed.generation,
        bytes_received: task.record.bytes_done,
      });
    } catch (err) {
      const apiError = toApiError(err);
      await fsp.rm(staged, { force: true });
      task.fail(apiError);
      throw apiError;
    } finally {
      release();
    }
  }

  private async land(vdi: Vdi, staged: string, req: WholeImport, limit: number, task: RunningTask) {
    const handle = await fsp.open(staged, 'w+');
    try {
      // A raw image is the disk: size the file now so unsent tails are holes.
      if (req.format === 'raw') await handle.truncate(vdi.virtual_size);
      const received = await landStream(req.body, handle, {
        offset: 0,
        limit,
        tooLarge: tooLargeForVdi(vdi.virtual_size),
        onBytes: (n) => task.addBytes(n),
        signal: task.signal,
      });
      // Trailing zero blocks were skipped, so fix the container file's length.
      if (req.format !== 'raw') await handle.truncate(received);
      await handle.sync();
    } finally {
      await handle.close();
    }
  }
}

/** Names failures that are not ours: mostly, the client went away mid-upload. */
export function toApiError(err: unknown): ApiError {
  if (err instanceof ApiError) return err;
  const code = (err as NodeJS.ErrnoException)?.code;
  if (
    code === 'ECONNRESET' ||
    code === 'ERR_STREAM_PREMATURE_CLOSE' ||
    (err as Error)?.message === 'aborted'
  ) {
    return new ApiError(
      400,
      'CLIENT_DISCONNECTED',
      'the client closed the connection before the whole image arrived; nothing was changed: send it again, or use a resumable transfer',
    );
  }
  return new ApiError(500, 'INTERNAL_ERROR', (err as Error)?.message ?? String(err));
}
