/** PUT (import) and GET/HEAD (export) of /v1/vdis/{vdi}/contents?format=F */
import { Router } from 'express';
import { importOneShot } from '../http/one-shot-import.js';
import { baseParam, contentLengthOf, formatParam } from '../http/params.js';
import { sendExport } from '../http/send-export.js';
import type { Services } from '../services.js';

export function contentRoutes(s: Services): Router {
  return Router()
    .put('/v1/vdis/:vdi/contents', async (req, res) => {
      const task = await importOneShot(s, req, res, {
        vdi: req.params.vdi,
        format: formatParam(req),
        contentLength: contentLengthOf(req),
        base: baseParam(req),
      });
      res.status(200).location(`/v1/tasks/${task.id}`).json(task);
    })
    .get('/v1/vdis/:vdi/contents', async (req, res) => {
      await sendExport(s, req, res, req.params.vdi, formatParam(req), undefined, baseParam(req));
    });
}
