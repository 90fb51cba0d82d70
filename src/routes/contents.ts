/** PUT (import) and GET/HEAD (export) of /v1/vdis/{vdi}/contents?format=F */
import { type Request, type Response, Router } from 'express';
import { BadRequestError, toApiError } from '../errors.js';
import { codecFor } from '../formats/index.js';
import { continueNow } from '../http/continue.js';
import { writeBody, writeHead } from '../http/ranges.js';
import type { Services } from '../services.js';
import { openExport } from '../transfer/export.js';

export function formatParam(req: Request): string {
  const format = typeof req.query.format === 'string' && req.query.format !== '' ? req.query.format : 'raw';
  return codecFor(format).name;
}

export function contentLengthOf(req: Request): number | undefined {
  const header = req.get('content-length');
  if (header === undefined || req.get('transfer-encoding')) return undefined;
  const n = Number(header);
  if (!Number.isSafeInteger(n) || n < 0)
    throw new BadRequestError(`Content-Length '${header}' is not a byte count`);
  return n;
}

/**
 * Streams an export of a VDI (GET) or just its headers (HEAD). Each GET is an
 * export task of its own, unless it serves a download session, whose task
 * counts the bytes of all its requests.
 */
export async function sendExport(
  s: Services,
  req: Request,
  res: Response,
  vdiId: string,
  format: string,
  session?: { taskId: string; onBytes: (n: number) => void },
) {
  const source = await openExport(s.vdis, vdiId, format);
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
    const task = s.tasks.start('export', vdiId, { bytesTotal: plan.bodyLength, format });
    res.setHeader('X-Task-Id', task.id);
    try {
      await writeBody(res, rep, plan, (n) => task.addBytes(n), task.signal);
      task.succeed({ vdi: vdiId, format, bytes_sent: task.record.bytes_done, etag: source.etag });
    } catch (err) {
      task.fail(toApiError(err));
      res.destroy();
    }
  } finally {
    await source.close();
  }
}

export function contentRoutes(s: Services): Router {
  return Router()
    .put('/v1/vdis/:vdi/contents', async (req, res) => {
      const task = await s.transfers.importWhole({
        vdi: req.params.vdi,
        format: formatParam(req),
        body: req,
        contentLength: contentLengthOf(req),
        beforeBody: () => continueNow(res),
      });
      res.status(200).location(`/v1/tasks/${task.id}`).json(task);
    })
    .get('/v1/vdis/:vdi/contents', async (req, res) => {
      await sendExport(s, req, res, req.params.vdi, formatParam(req));
    });
}
