/**
 * ovirt-imageio's ticket management, under the management token:
 *   PUT    /v1/imageio/tickets/{id}            install (imageio's ticket JSON; url names vdi:{id})
 *   GET    /v1/imageio/tickets/{id}            status: active, transferred, connections, expires, idle_time, canceled
 *   PATCH  /v1/imageio/tickets/{id}            {"timeout": N}: expires N s from now
 *   DELETE /v1/imageio/tickets/{id}[?finalize=true]   cancel (the VDI as it was), or finalize and remove
 *   POST   /v1/imageio/tickets/{id}/finalize   commit the upload atomically, as a task (?wait=S)
 */
import { Router } from 'express';
import { ApiError, isErrorCode } from '../errors.js';
import type { Services } from '../services.js';
import type { TicketRequest } from '../transfer/imageio-tickets.js';

const MAX_WAIT_SECONDS = 300;

function bodyObject(body: unknown): Record<string, unknown> {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) {
    throw new ApiError('INVALID_REQUEST', 'send a JSON object (Content-Type: application/json)');
  }
  return body as Record<string, unknown>;
}

export function imageioTicketRoutes(s: Services): Router {
  return Router()
    .put('/v1/imageio/tickets/:id', async (req, res) => {
      const status = await s.tickets.install(req.params.id, bodyObject(req.body) as unknown as TicketRequest);
      res.status(200).location(`/v1/imageio/tickets/${req.params.id}`).json(status);
    })
    .get('/v1/imageio/tickets/:id', (req, res) => {
      res.json(s.tickets.status(req.params.id));
    })
    .patch('/v1/imageio/tickets/:id', (req, res) => {
      const body = bodyObject(req.body);
      if (body.timeout === undefined)
        throw new ApiError('INVALID_REQUEST', "Missing required value for 'timeout'");
      res.json(s.tickets.extend(req.params.id, body.timeout));
    })
    .delete('/v1/imageio/tickets/:id', async (req, res) => {
      const finalize = req.query.finalize === 'true' || req.query.finalize === 'y';
      const task = await s.tickets.remove(req.params.id, finalize);
      if (finalize && task && task.status !== 'success') {
        const code = isErrorCode(task.error?.code) ? task.error.code : 'INTERNAL_ERROR';
        throw new ApiError(code, task.error?.message ?? `the finalize ended ${task.status}`, {
          task_id: task.id,
        });
      }
      res.status(204).end();
    })
    .post('/v1/imageio/tickets/:id/finalize', async (req, res) => {
      const started = await s.tickets.finalize(req.params.id);
      const wait = Number(req.query.wait ?? 0);
      const task = wait > 0 ? await s.tasks.wait(started.id, Math.min(wait, MAX_WAIT_SECONDS)) : started;
      res.status(202).location(`/v1/tasks/${task.id}`).json(task);
    });
}
