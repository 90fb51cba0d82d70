/** /v1/disk-sets: sets of VDIs, their members, and their consistent snapshots */
import { Router } from 'express';
import { validateBody } from '../http/openapi.js';
import { pageParams, sendPage } from '../http/paging.js';
import type { Services } from '../services.js';
import type { CreateDiskSet } from '../storage/disk-sets.js';
import type { SnapshotRequest } from '../storage/snapshots.js';
import type { SetMigrateRequest } from '../transfer/set-migration.js';

export function diskSetRoutes(s: Services): Router {
  const sets = s.diskSets;
  return Router()
    .get('/v1/disk-sets', (req, res) => {
      const page = sets.listPage(pageParams(req));
      sendPage(req, res, { ...page, items: page.items.map((d) => sets.toJson(d)) });
    })
    .post('/v1/disk-sets', (req, res) => {
      const set = sets.create(validateBody<CreateDiskSet>('DiskSetCreate', req.body));
      res.status(201).location(`/v1/disk-sets/${set.id}`).json(sets.toJson(set));
    })
    .get('/v1/disk-sets/:set', (req, res) => {
      res.json(sets.toJson(sets.get(req.params.set)));
    })
    .patch('/v1/disk-sets/:set', (req, res) => {
      const patch = validateBody<{ name_label?: string; name_description?: string }>(
        'DiskSetUpdate',
        req.body,
      );
      res.json(sets.toJson(sets.update(req.params.set, patch)));
    })
    .delete('/v1/disk-sets/:set', (req, res) => {
      sets.delete(req.params.set);
      res.status(204).end();
    })
    .get('/v1/disk-sets/:set/vdis', async (req, res) => {
      const members = sets.members(req.params.set);
      res.json(await Promise.all(members.map((v) => s.vdis.toJson(v))));
    })
    .post('/v1/disk-sets/:set/vdis', (req, res) => {
      const { vdis } = validateBody<{ vdis: string[] }>('DiskSetAdd', req.body);
      const added = sets.addAll(req.params.set, vdis);
      res.json({ ...sets.toJson(sets.get(req.params.set)), added });
    })
    .delete('/v1/disk-sets/:set/vdis', (req, res) => {
      sets.removeAll(req.params.set);
      res.status(204).end();
    })
    .put('/v1/disk-sets/:set/vdis/:vdi', async (req, res) => {
      const added = sets.add(req.params.set, req.params.vdi);
      res.status(added ? 201 : 200).json(await s.vdis.toJson(s.vdis.get(req.params.vdi)));
    })
    .delete('/v1/disk-sets/:set/vdis/:vdi', (req, res) => {
      sets.remove(req.params.set, req.params.vdi);
      res.status(204).end();
    })
    .post('/v1/disk-sets/:set/snapshots', (req, res) => {
      const body = validateBody<SnapshotRequest>('SnapshotCreate', req.body ?? {});
      const snap = sets.snapshot(req.params.set, body);
      res.status(201).location(`/v1/disk-sets/${snap.disk_set}/snapshots/${snap.id}`).json(snap);
    })
    .get('/v1/disk-sets/:set/snapshots', (req, res) => {
      sendPage(req, res, sets.listSnapshots(req.params.set, pageParams(req)));
    })
    .get('/v1/disk-sets/:set/snapshots/:snapshot', (req, res) => {
      res.json(sets.getSnapshot(req.params.set, req.params.snapshot));
    })
    .post('/v1/disk-sets/:set/migrate', async (req, res) => {
      const body = validateBody<SetMigrateRequest>('DiskSetMigrate', req.body);
      const task = await s.setMigrations.start(req.params.set, body);
      res.status(202).location(`/v1/tasks/${task.id}`).json(task);
    })
    .delete('/v1/disk-sets/:set/snapshots/:snapshot', async (req, res) => {
      await sets.deleteSnapshot(req.params.set, req.params.snapshot);
      res.status(204).end();
    });
}
