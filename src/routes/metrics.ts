/** GET /metrics (Prometheus text format); behind the bearer token when the service has one. */
import { Router } from 'express';
import { requireToken } from '../http/auth.js';
import type { Services } from '../services.js';

export function metricsRoutes(s: Services): Router {
  return Router().get('/metrics', requireToken(s.config.token), async (_req, res) => {
    const { contentType, body } = await s.metrics.render();
    res.type(contentType).send(body);
  });
}
