/**
 * xapi-compatible aliases, so XenServer / XCP-ng scripts work unchanged:
 *   PUT  /import_raw_vdi?vdi=UUID&format=raw|vhd|qcow2   (body: the image)
 *   GET  /export_raw_vdi?vdi=UUID&format=raw|vhd|qcow2   (also HEAD)
 * `format` defaults to raw. `session_id` is xapi's credential: it is ignored
 * when the service has no token, and is accepted as the token when it has
 * one. `task_id` names a task the caller created in xapi; diskport cannot
 * adopt it, so it is ignored and the transfer runs as its own diskport task
 * (X-Task-Id, and Location for imports).
 *
 * Xen Orchestra's ways are honoured: the empty probe it sends before each
 * upload changes nothing (see http/one-shot-import.ts), and a declared length
 * larger than any disk means "unknown": the body is read to the end of the
 * connection (see http/read-to-eof.ts) and refused only if it turns out
 * larger than the VDI takes.
 */
import type { IncomingMessage } from 'node:http';
import { type Request, type RequestHandler, Router } from 'express';
import { ApiError } from '../errors.js';
import { MAX_VIRTUAL_SIZE_BYTES as QCOW2_MAX_VIRTUAL_SIZE_BYTES } from '../formats/qcow2/index.js';
import { requireToken } from '../http/auth.js';
import { leanReadWithin } from '../http/lean-read.js';
import { importOneShot } from '../http/one-shot-import.js';
import { baseParam, contentLengthOf, formatParam } from '../http/params.js';
import { sendExport } from '../http/send-export.js';
import { safeEqual } from '../secrets.js';
import type { Services } from '../services.js';
import { uploadLimit } from '../transfer/upload-rules.js';

/**
 * The largest upload any VDI can take: a qcow2 image of the largest disk the
 * formats describe (qcow2's 64 TiB). A declared length past it is no length:
 * Xen Orchestra declares 1 PiB when it does not know one.
 */
const LARGEST_UPLOAD_BYTES = uploadLimit('qcow2', QCOW2_MAX_VIRTUAL_SIZE_BYTES);

const IMPORT_RAW_VDI_PATH = /^\/import_raw_vdi\/?(?:\?|$)/i;

/** An xapi import whose Content-Length says "unknown": its body ends with the connection. */
export function readsToEndOfConnection(req: IncomingMessage): boolean {
  if (req.method !== 'PUT' || req.headers['transfer-encoding'] !== undefined) return false;
  // The path, case aside, is /import_raw_vdi or /import_raw_vdi/ (checked on every PUT: no copy of the url).
  if (!IMPORT_RAW_VDI_PATH.test(req.url ?? '')) return false;
  const declared = req.headers['content-length'] ?? '';
  return /^\d+$/.test(declared) && Number(declared) > LARGEST_UPLOAD_BYTES;
}

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
      const task = await importOneShot(s, req, res, {
        vdi: vdiParam(req),
        format: formatParam(req),
        contentLength: readsToEndOfConnection(req) ? undefined : contentLengthOf(req),
        base: baseParam(req),
        // xapi lays a differencing VHD's blocks onto the VDI as it is.
        layDifferencing: formatParam(req) === 'vhd',
      });
      res.status(200).location(`/v1/tasks/${task.id}`).setHeader('X-Task-Id', task.id).json(task);
    })
    .get('/export_raw_vdi', auth, async (req, res) => {
      const vdi = vdiParam(req);
      const format = formatParam(req);
      const base = baseParam(req);
      // A differencing export (base) is built per request: the stream path's.
      const lean = base === undefined ? leanReadWithin(s, req, res, vdi, format) : undefined;
      await (lean ?? sendExport(s, req, res, vdi, format, undefined, base));
    });
}
