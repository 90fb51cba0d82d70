/** GET /v1/tasks, GET /v1/tasks/{task}?wait=S, POST /v1/tasks/{task}/cancel */
import { Router } from 'express';
import { ApiError } from '../errors.js';
import { pageParams, sendPage } from '../http/paging.js';
import type { Services } from '../services.js';

const TASK_STATUSES = ['pending', 'running', 'success', 'failure', 'cancelled'];
const MAX_WAIT_SECONDS = 300;

function queryString(v: unknown): string | undefined {
  return typeof v === 'string' && v !== '' ? v : undefined;
}

export function taskRoutes(s: Services): Router {
  return Router()
    .get('/v1/tasks', (req, res) => {
      const status = queryString(req.query.status);
      if (status && !TASK_STATUSES.includes(status)) {
        throw new ApiError(
          'INVALID_REQUEST',
          `status must be one of ${TASK_STATUSES.join(', ')}, got '${status}'`,
        );
      }
      const filter = { status, vdi: queryString(req.query.vdi), type: queryString(req.query.type) };
      sendPage(req, res, s.tasks.listPage(filter, pageParams(req)));
    })
    .get('/v1/tasks/:task', async (req, res) => {
      const waitParam = queryString(req.query.wait);
      const wait = waitParam === undefined ? 0 : Number(waitParam);
      if (!Number.isFinite(wait) || wait < 0 || wait > MAX_WAIT_SECONDS) {
        throw new ApiError(
          'INVALID_REQUEST',
          `wait must be a number of seconds between 0 and ${MAX_WAIT_SECONDS}, got '${waitParam}'`,
        );
      }
      res.json(await s.tasks.wait(req.params.task, wait));
    })
    .post('/v1/tasks/:task/cancel', (req, res) => {
      res.status(202).json(s.tasks.cancel(req.params.task));
    });
}
