/**
 * xapi-compatible aliases, so XenServer / XCP-ng scripts work unchanged:
 *   PUT  /import_raw_vdi?vdi=UUID&format=raw|vhd|qcow2   (body: the image)
 *   GET  /export_raw_vdi?vdi=UUID&format=raw|vhd|qcow2   (also HEAD)
 * `format` defaults to raw. `session_id` is xapi's credential: it is ignored
 * when the service has no token, and is accepted as the token when it has
 * one. `task_id` names a task the caller created in xapi; diskport cannot
 * adopt it, so it is ignored and the transfer runs as its own diskport task
 * (X-Task-Id, and Location for imports).
 */
import { type Request, type RequestHandler, Router } from 'express';
import { ApiError } from '../errors.js';
import { requireToken } from '../http/auth.js';
import { continueNow } from '../http/continue.js';
import { contentLengthOf, formatParam } from '../http/params.js';
import { sendExport } from '../http/send-export.js';
import { safeEqual } from '../secrets.js';
import type { Services } from '../services.js';

/**
 * With a token, any of: `Authorization: Bearer <token>`, `session_id=<token>`
 * in the query, or HTTP Basic auth whose password is the token (credentials
 * in the URL, as xapi examples write them).
 */
export function xapiAuth(token: string | undefined): RequestHandler {
  const bearer = requireToken(token);
  return (req, res, next) => {
    if (!token) return next();
    const header = req.get('authorization');
    if (header && /^Basic\s/i.test(header)) {
      const decoded = Buffer.from(header.replace(/^Basic\s+/i, ''), 'base64').toString('utf8');
      const password = decoded.slice(decoded.indexOf(':') + 1);
      if (safeEqual(password, token)) return next();
      return next(new ApiError('TOKEN_INVALID', 'the password is not the token of this service'));
    }
    if (header) return bearer(req, res, next);
    const session = req.query.session_id;
    if (typeof session === 'string' && session !== '') {
      if (safeEqual(session, token)) return next();
      return next(
        new ApiError(
          'TOKEN_INVALID',
          'session_id is not valid for this service: pass the service token as session_id, or send Authorization: Bearer <token>',
        ),
      );
    }
    next(
      new ApiError(
        'TOKEN_REQUIRED',
        'this call needs a token: pass it as session_id=<token>, or send Authorization: Bearer <token>',
      ),
    );
  };
}

function vdiParam(req: Request): string {
  const vdi = req.query.vdi;
  if (typeof vdi !== 'string' || vdi === '')
    throw new ApiError('INVALID_REQUEST', "the 'vdi' query parameter is required: the VDI's id (uuid)");
  return vdi;
}

export function xapiRoutes(s: Services): Router {
  const auth = xapiAuth(s.config.token);
  return Router()
    .put('/import_raw_vdi', auth, async (req, res) => {
      const task = await s.transfers.importWhole({
        vdi: vdiParam(req),
        format: formatParam(req),
        body: req,
        contentLength: contentLengthOf(req),
        beforeBody: () => continueNow(res),
      });
      res.status(200).location(`/v1/tasks/${task.id}`).setHeader('X-Task-Id', task.id).json(task);
    })
    .get('/export_raw_vdi', auth, async (req, res) => {
      await sendExport(s, req, res, vdiParam(req), formatParam(req));
    });
}
