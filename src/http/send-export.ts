/**
 * GET/HEAD of an export, shared by the routes that serve one: the VDI's
 * contents, the xapi alias and download sessions. Conditionals and ranges
 * are answered here; the task (when there is one) belongs to the transfer
 * layer.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { toApiError } from '../errors.js';
import type { VdiStore } from '../storage/vdis.js';
import type { TaskManager } from '../tasks/task-manager.js';
import { type ExportSource, openExport, type ReadCounters, runExportTask } from '../transfer/export.js';
import { logCause } from './errors.js';
import { writeBody, writeHead } from './ranges.js';

/** Plain Node types: express's request and response are these, and so are the lean path's. */
type Request = IncomingMessage;
type Response = ServerResponse;

export interface ExportDeps {
  vdis: VdiStore;
  tasks: TaskManager;
  reads: ReadCounters;
}

/** A download session's GET: its task counts the bytes of all its requests. */
export interface SessionExport {
  taskId: string;
  onBytes: (n: number) => void;
  /** A read for it failed (before or after the first byte): the session decides whether it ends. */
  onReadFailed: (err: unknown) => void;
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
  /** A snapshot of the VDI: export only what changed since it (a differencing image). */
  base?: string,
): Promise<void> {
  const source = await openExport(deps.vdis, vdiId, format, base).catch((err) => {
    session?.onReadFailed(err);
    throw err;
  });
  await sendSource(deps, req, res, source, session);
}

/** sendExport of a source opened already (closed here once sent). */
export async function sendSource(
  deps: ExportDeps,
  req: Request,
  res: Response,
  source: ExportSource,
  session?: SessionExport,
): Promise<void> {
  const { format } = source;
  try {
    const rep = { ...source, contentType: 'application/octet-stream' };
    const plan = writeHead(req, res, rep);
    if (req.method === 'HEAD' || plan.status === 304) {
      res.end();
      return;
    }
    const failed = (err: unknown) => bodyFailed(req, res, err);
    const sendfiled = (n: number) => deps.reads.countSendfile(n);
    if (session) {
      res.setHeader('X-Task-Id', session.taskId);
      await writeBody(res, rep, plan, session.onBytes, undefined, sendfiled).catch((err) => {
        session.onReadFailed(err);
        failed(err);
      });
      return;
    }
    if (plan.status === 206) {
      deps.reads.countRequest(format);
      await writeBody(res, rep, plan, (n) => deps.reads.countBytes(format, n), undefined, sendfiled).catch(
        failed,
      );
      return;
    }
    await runExportTask(deps.tasks, source, plan.bodyLength, (task) => {
      res.setHeader('X-Task-Id', task.id);
      return writeBody(res, rep, plan, task.onBytes, task.signal, sendfiled);
    }).catch(failed);
  } finally {
    await source.close();
  }
}

/** The headers writeHead set for the body that will not come. */
const REPRESENTATION_HEADERS = [
  'Content-Length',
  'Content-Type',
  'Content-Range',
  'Content-Disposition',
  'ETag',
  'Last-Modified',
  'Accept-Ranges',
];

/**
 * An export whose body failed. Before its first byte the client can still
 * be told why: the error is rethrown for the error middleware to answer in
 * JSON. After it, the status and Content-Length are gone: the connection is
 * cut, so the client sees a short body (never a wrong one), and the cause is
 * logged.
 */
function bodyFailed(req: Request, res: Response, err: unknown): void {
  if (!res.headersSent && !res.destroyed) {
    for (const name of REPRESENTATION_HEADERS) res.removeHeader(name);
    throw err;
  }
  const e = toApiError(err);
  if (e.status >= 500) req.log?.error({ err: logCause(e) }, 'export failed mid-stream; connection cut');
  else req.log?.info({ code: e.code, message: e.message }, 'export ended early');
  res.destroy();
}
