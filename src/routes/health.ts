import { Router } from 'express';

export function healthRoutes(): Router {
  return Router().get('/healthz', (_req, res) => {
    res.json({ status: 'ok' });
  });
}
