/** GET /v1/srs[/{sr}] */
import { Router } from 'express';
import type { Services } from '../services.js';
import type { Sr } from '../storage/srs.js';

export function srRoutes(s: Services): Router {
  const srJson = async (sr: Sr) => s.srs.toJson(sr, await s.vdis.srUtilisation(sr));
  return Router()
    .get('/v1/srs', async (_req, res) => {
      res.json(await Promise.all(s.srs.list().map(srJson)));
    })
    .get('/v1/srs/:sr', async (req, res) => {
      res.json(await srJson(s.srs.get(req.params.sr)));
    });
}
