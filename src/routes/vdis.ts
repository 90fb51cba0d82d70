/** POST/GET /v1/vdis, GET/PATCH/DELETE /v1/vdis/{vdi} */
import { Router } from 'express';
import { ApiError } from '../errors.js';
import { validateBody } from '../http/openapi.js';
import { pageParams, sendPage } from '../http/paging.js';
import type { Services } from '../services.js';
import type { CreateVdi } from '../storage/vdis.js';

export function vdiRoutes(s: Services): Router {
  return Router()
    .get('/v1/vdis', async (req, res) => {
      const page = s.vdis.listPage(pageParams(req));
      sendPage(req, res, { ...page, items: await Promise.all(page.items.map((v) => s.vdis.toJson(v))) });
    })
    .post('/v1/vdis', async (req, res) => {
      const vdi = await s.vdis.create(validateBody<CreateVdi>('VdiCreate', req.body));
      res
        .status(201)
        .location(`/v1/vdis/${vdi.id}`)
        .json(await s.vdis.toJson(vdi));
    })
    .get('/v1/vdis/:vdi', async (req, res) => {
      res.json(await s.vdis.toJson(s.vdis.get(req.params.vdi)));
    })
    .patch('/v1/vdis/:vdi', async (req, res) => {
      const patch = validateBody<{ name_label?: string; name_description?: string; virtual_size?: number }>(
        'VdiUpdate',
        req.body,
      );
      res.json(await s.vdis.toJson(await s.vdis.update(req.params.vdi, patch)));
    })
    .delete('/v1/vdis/:vdi', async (req, res) => {
      const open = s.transfers.activeOn(req.params.vdi);
      if (open.length) {
        throw new ApiError(
          'VDI_BUSY',
          `VDI ${req.params.vdi} has ${open.length} open transfer(s) (${open[0].id}); cancel or finish them first`,
          { transfers: open.map((t) => t.id) },
        );
      }
      await s.vdis.delete(req.params.vdi);
      res.status(204).end();
    });
}
