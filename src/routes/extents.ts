/** GET /v1/vdis/{vdi}/extents[?context=zero] */
import { Router } from 'express';
import { ApiError } from '../errors.js';
import { vdiExtents } from '../ops/extents.js';
import type { Services } from '../services.js';

/** ovirt-imageio also knows `dirty` (changed-block tracking), which diskport does not keep. */
const CONTEXTS = ['zero'];

export function extentRoutes(s: Services): Router {
  return Router().get('/v1/vdis/:vdi/extents', async (req, res) => {
    const context = req.query.context;
    if (context !== undefined && (typeof context !== 'string' || !CONTEXTS.includes(context))) {
      throw new ApiError(
        'INVALID_REQUEST',
        `context must be one of: ${CONTEXTS.join(', ')} (or left out), got '${String(context)}'`,
        { context: String(context), supported: CONTEXTS },
      );
    }
    const extents = await vdiExtents(s.vdis, req.params.vdi);
    res.json(extents.map((e) => ({ start: e.start, length: e.length, zero: e.zero })));
  });
}
