/** POST/GET /v1/vdis, GET/PATCH/DELETE /v1/vdis/{vdi}, its snapshots and clones, its push to another diskport */
import { type Request, type Response, Router } from 'express';
import { ApiError } from '../errors.js';
import { validateBody } from '../http/openapi.js';
import { pageParams, sendPage } from '../http/paging.js';
import type { CopyTarget } from '../ops/vdi-copy.js';
import type { Services } from '../services.js';
import type { Page } from '../storage/paging.js';
import type { CloneRequest, SnapshotRequest } from '../storage/snapshots.js';
import type { CreateVdi, Vdi, VdiFilter } from '../storage/vdis.js';
import type { Task } from '../tasks/task-store.js';
import { startVdiPush, type VdiPushRequest } from '../transfer/push-incremental.js';

export function vdiRoutes(s: Services): Router {
  const sendVdis = async (req: Request, res: Response, page: Page<Vdi>) =>
    sendPage(req, res, { ...page, items: await Promise.all(page.items.map((v) => s.vdis.toJson(v))) });
  const created = async (res: Response, vdi: Vdi) =>
    res
      .status(201)
      .location(`/v1/vdis/${vdi.id}`)
      .json(await s.vdis.toJson(vdi));
  const accepted = (res: Response, task: Task) => res.status(202).location(`/v1/tasks/${task.id}`).json(task);
  return Router()
    .get('/v1/vdis', async (req, res) => {
      await sendVdis(req, res, s.vdis.listPage(vdiFilter(req), pageParams(req)));
    })
    .post('/v1/vdis', async (req, res) => {
      await created(res, await s.vdis.create(validateBody<CreateVdi>('VdiCreate', req.body)));
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
    })
    .post('/v1/vdis/:vdi/snapshots', async (req, res) => {
      const body = validateBody<SnapshotRequest>('SnapshotCreate', req.body ?? {});
      await created(res, await s.snapshots.snapshot(req.params.vdi, body));
    })
    .get('/v1/vdis/:vdi/snapshots', async (req, res) => {
      await sendVdis(req, res, s.snapshots.listOf(req.params.vdi, pageParams(req)));
    })
    .post('/v1/vdis/:vdi/clone', async (req, res) => {
      const body = validateBody<CloneRequest>('VdiClone', req.body ?? {});
      const source = s.vdis.get(req.params.vdi);
      // Same SR and format: a shared file, made now; anywhere else: a copy, as a task.
      if (!s.copies.needsCopy(source, body)) {
        await created(res, await s.snapshots.clone(source.id, body));
        return;
      }
      accepted(res, await s.copies.clone(source.id, { ...body, sr: body.sr ?? source.sr_id }));
    })
    .post('/v1/vdis/:vdi/migrate', async (req, res) => {
      const body = validateBody<CopyTarget>('VdiMigrate', req.body ?? {});
      accepted(res, await s.copies.migrate(req.params.vdi, body));
    })
    .post('/v1/vdis/:vdi/push', async (req, res) => {
      const body = validateBody<VdiPushRequest>('VdiPush', req.body ?? {});
      accepted(res, await startVdiPush(s, req.params.vdi, body));
    });
}

function vdiFilter(req: Request): VdiFilter {
  const filter: VdiFilter = {};
  const { is_snapshot, snapshot_of } = req.query;
  if (is_snapshot !== undefined) {
    if (is_snapshot !== 'true' && is_snapshot !== 'false') {
      throw new ApiError(
        'INVALID_REQUEST',
        `is_snapshot must be 'true' or 'false', got '${String(is_snapshot)}'`,
      );
    }
    filter.is_snapshot = is_snapshot === 'true';
  }
  if (snapshot_of !== undefined) {
    if (typeof snapshot_of !== 'string' || snapshot_of === '') {
      throw new ApiError('INVALID_REQUEST', 'snapshot_of must name a VDI id');
    }
    filter.snapshot_of = snapshot_of;
  }
  return filter;
}
