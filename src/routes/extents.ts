/**
 * GET /v1/vdis/{vdi}/extents[?context=zero|dirty&since={snapshot}]
 * GET /v1/vdis/{vdi}/changed-blocks?base={snapshot}
 */
import { Router } from 'express';
import { ApiError } from '../errors.js';
import { CHANGED_BLOCK_BYTES, changedBitmap, changedBlocks, dirtyExtents } from '../ops/changed-blocks.js';
import { vdiExtents } from '../ops/extents.js';
import type { Services } from '../services.js';

const CONTEXTS = ['zero', 'dirty'];

function snapshotParam(value: unknown, name: string): string {
  if (typeof value === 'string' && value !== '') return value;
  throw new ApiError(
    'INVALID_REQUEST',
    `${name} must name a snapshot of the VDI (its id), got '${value === undefined ? '' : String(value)}'`,
    { [name]: value === undefined ? null : String(value) },
  );
}

export function extentRoutes(s: Services): Router {
  return Router()
    .get('/v1/vdis/:vdi/extents', async (req, res) => {
      const context = req.query.context;
      if (context !== undefined && (typeof context !== 'string' || !CONTEXTS.includes(context))) {
        throw new ApiError(
          'INVALID_REQUEST',
          `context must be one of: ${CONTEXTS.join(', ')} (or left out), got '${String(context)}'`,
          { context: String(context), supported: CONTEXTS },
        );
      }
      if (context === 'dirty') {
        const since = snapshotParam(req.query.since, 'since');
        const { vdi, runs } = await changedBlocks(s.vdis, req.params.vdi, since);
        res.json(
          dirtyExtents(vdi.virtual_size, runs).map((e) => ({
            start: e.start,
            length: e.length,
            dirty: e.dirty,
          })),
        );
        return;
      }
      const extents = await vdiExtents(s.vdis, req.params.vdi);
      res.json(extents.map((e) => ({ start: e.start, length: e.length, zero: e.zero })));
    })
    .get('/v1/vdis/:vdi/changed-blocks', async (req, res) => {
      const base = snapshotParam(req.query.base, 'base');
      const { vdi, runs } = await changedBlocks(s.vdis, req.params.vdi, base);
      res.json({
        block_size: CHANGED_BLOCK_BYTES,
        bitmap: changedBitmap(vdi.virtual_size, runs).toString('base64'),
      });
    });
}
