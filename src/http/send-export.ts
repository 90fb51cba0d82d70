/**
 * GET/HEAD of an export, shared by the routes that serve one: the VDI's
 * contents, the xapi alias and download sessions. Conditionals and ranges
 * are answered here; the task (when there is one) belongs to the transfer
 * layer.
 */
import type { Request, Response } from 'express';
import type { VdiStore } from '../storage/vdis.js';
import type { TaskManager } from '../tasks/task-manager.js';
import { openExport, type ReadCounters, runExportTask } from '../transfer/export.js';
import { writeBody, writeHead } from './ranges.js';

export interface ExportDeps {
  vdis: VdiStore;
  tasks: TaskManager;
  reads: ReadCounters;
}

/** A download session's GET: its task counts the bytes of all its requests. */
export interface SessionExport {
  taskId: string;
  onBytes: (n: number) => void;
}

/**
 * Streams an export of a VDI (GET) or just its headers (HEAD). A GET of the
 * whole image is an export task of its own; a ranged GET reads part of the
 * disk, which is not a long operation: it is only counted (ReadCounters).
 * A download session's GETs count toward the session's task.
 */
export async function sendExport(
  deps: ExportDeps,
  req: Request,
  res: Response,
  vdiId: string,
  format: string,
  session?: SessionExport,
): Promise<void> {
  const source = await openExport(deps.vdis, vdiId, format);
  try {
    const rep = { ...source, contentType: 'application/octet-stream' };
    const plan = writeHead(req, res, rep);
    if (req.method === 'HEAD' || plan.status === 304) {
      res.end();
      return;
    }
    if (session) {
      res.setHeader('X-Task-Id', session.taskId);
      await writeBody(res, rep, plan, session.onBytes).catch(() => res.destroy());
      return;
    }
    if (plan.status === 206) {
      deps.reads.countRequest(format);
      await writeBody(res, rep, plan, (n) => deps.reads.countBytes(format, n)).catch(() => res.destroy());
      return;
    }
    await runExportTask(deps.tasks, source, plan.bodyLength, (task) => {
      res.setHeader('X-Task-Id', task.id);
      return writeBody(res, rep, plan, task.onBytes, task.signal);
    }).catch(() => res.destroy());
  } finally {
    await source.close();
  }
}
