/** GET /v1/nodes: the nodes sharing this metadata store, with their heartbeats. */
import { Router } from 'express';
import type { Services } from '../services.js';

export function nodeRoutes(s: Services): Router {
  return Router().get('/v1/nodes', (_req, res) => {
    res.json(
      s.nodes.list().map((n) => ({
        id: n.id,
        address: n.address,
        hostname: n.hostname,
        pid: n.pid,
        started_at: n.started_at,
        heartbeat_at: n.heartbeat_at,
        stopped_at: n.stopped_at,
        alive: n.alive,
        self: n.id === s.nodes.id,
      })),
    );
  });
}
