/**
 * /v1/migrations: the destination side of a set migration. `receive` needs
 * the management token; everything under /v1/migrations/{id} takes the
 * migration's own credential (the token's secret, as a bearer) instead.
 */
import { type RequestHandler, type Response, Router } from 'express';
import { ApiError } from '../errors.js';
import { validateBody } from '../http/openapi.js';
import { safeEqual } from '../secrets.js';
import type { Services } from '../services.js';
import type { CreateVdi } from '../storage/vdis.js';

/** Mounted on /v1/migrations/:id before the management token check. */
export function migrationAuth(s: Services): RequestHandler {
  return (req, res, next) => {
    const bearer = /^Bearer\s+(.+)$/i.exec(req.get('authorization') ?? '')?.[1]?.trim();
    const id = req.params.id as string;
    if (!bearer || (s.config.token && safeEqual(bearer, s.config.token))) return next();
    if (!s.migrationsIn.secretMatches(id, bearer)) {
      return next(new ApiError('TOKEN_INVALID', 'this token is not valid for this migration'));
    }
    res.locals.migration = id;
    next();
  };
}

export function migrationRoutes(s: Services): Router {
  const m = s.migrationsIn;
  const scoped = (res: Response, id: string) => {
    if (res.locals.migration === id || res.locals.managementAuthorized || !s.config.token) return;
    throw new ApiError('TOKEN_INVALID', 'this token is not valid for this migration');
  };
  return Router()
    .post('/v1/migrations/receive', (req, res) => {
      const body = validateBody<{ sr?: string; ttl_seconds?: number }>('MigrationReceive', req.body ?? {});
      // Behind a proxy or NAT the Host a client used is not what the source reaches: --public-url is.
      const url = s.config.publicUrl ?? `${req.protocol}://${req.get('host')}`;
      const { token, migration } = m.open(url, body);
      res
        .status(201)
        .location(`/v1/migrations/${migration.id}`)
        .json({ ...m.toJson(migration), token });
    })
    .get('/v1/migrations/:id', async (req, res) => {
      scoped(res, req.params.id);
      const srs = await Promise.all(
        s.srs.list().map(async (sr) => s.srs.toJson(sr, await s.vdis.srUtilisation(sr))),
      );
      res.json({ ...m.toJson(m.get(req.params.id)), srs });
    })
    .post('/v1/migrations/:id/vdis', async (req, res) => {
      scoped(res, req.params.id);
      const vdi = await m.createVdi(req.params.id, validateBody<CreateVdi>('VdiCreate', req.body));
      res.status(201).json(await s.vdis.toJson(vdi));
    })
    .post('/v1/migrations/:id/vdis/:vdi/tickets', async (req, res) => {
      scoped(res, req.params.id);
      const body = validateBody<{ ticket?: string }>('MigrationTicket', req.body ?? {});
      const ticket = await m.ticket(req.params.id, req.params.vdi, body.ticket);
      res.status(201).json({ ticket, url: `/images/${ticket}` });
    })
    .get('/v1/migrations/:id/tickets/:ticket', (req, res) => {
      scoped(res, req.params.id);
      res.json(m.holding(req.params.id, req.params.ticket));
    })
    .post('/v1/migrations/:id/tickets/:ticket/finalize', async (req, res) => {
      scoped(res, req.params.id);
      res.json(await m.finalizeTicket(req.params.id, req.params.ticket));
    })
    .post('/v1/migrations/:id/commit', (req, res) => {
      scoped(res, req.params.id);
      res.json(m.toJson(m.commit(req.params.id)));
    })
    .delete('/v1/migrations/:id', async (req, res) => {
      scoped(res, req.params.id);
      res.json(m.toJson(await m.abort(req.params.id)));
    });
}
