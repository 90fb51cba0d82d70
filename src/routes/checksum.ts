/** GET /v1/vdis/{vdi}/checksum?algorithm=sha256|sha1|md5[&async=true|false] */
import { Router } from 'express';
import { ApiError } from '../errors.js';
import { parseAlgorithm } from '../ops/checksum.js';
import type { Services } from '../services.js';

function booleanParam(name: string, value: unknown): boolean | undefined {
  if (value === undefined || value === '') return undefined;
  if (value === 'true' || value === '1') return true;
  if (value === 'false' || value === '0') return false;
  throw new ApiError('INVALID_REQUEST', `${name} must be true or false, got '${String(value)}'`, {
    [name]: String(value),
  });
}

export function checksumRoutes(s: Services): Router {
  return Router().get('/v1/vdis/:vdi/checksum', async (req, res) => {
    const algorithm = parseAlgorithm(req.query.algorithm);
    const outcome = await s.checksums.checksum(req.params.vdi, algorithm, {
      async: booleanParam('async', req.query.async),
    });
    if (outcome.kind === 'task') {
      res.status(202).location(`/v1/tasks/${outcome.task.id}`).json(outcome.task);
      return;
    }
    // RFC 9211: say whether the value came from the cache.
    res.setHeader('Cache-Status', outcome.cached ? 'diskport; hit' : 'diskport; fwd=miss; stored');
    res.json(outcome.result);
  });
}
