/** PUT (import) and GET/HEAD (export) of /v1/vdis/{vdi}/contents?format=F */
import { type Request, type Response, Router } from 'express';
import { BadRequestError } from '../errors.js';
import { codecFor } from '../formats/index.js';
import { writeBody, writeHead } from '../http/ranges.js';
import type { Services } from '../services.js';
import { openExport } from '../transfer/export.js';
import { toApiError } from '../transfer/import.js';

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

/** Streams an export of a VDI (GET) or just its headers (HEAD); each GET is an export task. */
export async function sendExport(s: Services, req: Request, res: Response, vdiId: string, format: string) {
  const source = await openExport(s.vdis, vdiId, format);
  try {
    const rep = { ...source, contentType: 'application/octet-stream' };
    const plan = writeHead(req, res, rep);
    if (req.method === 'HEAD' || plan.status === 304) {
      res.end();
      return;
    }
    const task = s.tasks.start('export', vdiId, { bytesTotal: plan.bodyLength });
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
      const task = await s.imports.importWhole({
        vdi: req.params.vdi,
        format: formatParam(req),
        body: req,
        contentLength: contentLengthOf(req),
      });
      res.status(200).location(`/v1/tasks/${task.id}`).json(task);
    })
    .get('/v1/vdis/:vdi/contents', async (req, res) => {
      await sendExport(s, req, res, req.params.vdi, formatParam(req));
    });
}
