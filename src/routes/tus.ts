/**
 * tus 1.0 resumable uploads (https://tus.io/protocols/resumable-upload):
 *   OPTIONS /v1/tus/        Tus-Version, Tus-Extension, Tus-Checksum-Algorithm
 *   POST    /v1/tus/        create an upload (creation, creation-with-upload)
 *   HEAD    /v1/tus/{id}    Upload-Offset, Upload-Length, Upload-Metadata
 *   PATCH   /v1/tus/{id}    append at Upload-Offset (checksum: Upload-Checksum)
 *   DELETE  /v1/tus/{id}    terminate: the VDI stays as it was
 *
 * The protocol is @tus/server's (one handler per method); the storage is
 * TransferTusStore, over transfer sessions. This layer adds what @tus/server
 * lacks: the checksum extension (Upload-Checksum, checked by the session as
 * the body lands), errors as diskport's JSON, and the log of failures.
 */
import { Server } from '@tus/server';
import { ERRORS as TUS_ERRORS } from '@tus/utils';
import type { Response as ExpressResponse, Request } from 'express';
import { Router } from 'express';
import { NodeRequest } from 'srvx/node';
import { ApiError, type ErrorCode, toApiError } from '../errors.js';
import { toErrorBody } from '../http/errors.js';
import { parseUploadChecksum, TUS_CHECKSUM_ALGORITHMS } from '../http/tus-headers.js';
import type { Services } from '../services.js';
import { TransferTusStore, type TusRequestContext, tusRequest } from '../transfer/tus-store.js';

export const TUS_PATH = '/v1/tus';
const TUS_RESUMABLE = '1.0.0';

type TusErrorName = keyof typeof TUS_ERRORS;

/**
 * diskport's code for each error @tus/server raises itself. The status is the
 * registry's: a missing Upload-Offset is a 400 and a wrong Content-Type a 415
 * (tus 1.0's own answer), not @tus/server's 403s.
 */
const CODE_OF_TUS_ERROR: Record<TusErrorName, ErrorCode> = {
  MISSING_OFFSET: 'INVALID_TUS_REQUEST',
  ABORTED: 'INVALID_TUS_REQUEST',
  INVALID_TERMINATION: 'INVALID_TUS_REQUEST',
  ERR_LOCK_TIMEOUT: 'TRANSFER_BUSY',
  INVALID_CONTENT_TYPE: 'UNSUPPORTED_MEDIA_TYPE',
  FILE_NOT_FOUND: 'UPLOAD_NOT_FOUND',
  INVALID_OFFSET: 'OFFSET_MISMATCH',
  FILE_NO_LONGER_EXISTS: 'UPLOAD_GONE',
  ERR_SIZE_EXCEEDED: 'TOO_LARGE',
  ERR_MAX_SIZE_EXCEEDED: 'TOO_LARGE',
  INVALID_LENGTH: 'INVALID_TUS_REQUEST',
  INVALID_METADATA: 'INVALID_TUS_REQUEST',
  UNKNOWN_ERROR: 'INTERNAL_ERROR',
  FILE_WRITE_ERROR: 'INTERNAL_ERROR',
  UNSUPPORTED_CONCATENATION_EXTENSION: 'NOT_IMPLEMENTED',
  UNSUPPORTED_CREATION_DEFER_LENGTH_EXTENSION: 'NOT_IMPLEMENTED',
  UNSUPPORTED_EXPIRATION_EXTENSION: 'NOT_IMPLEMENTED',
};

/** Codes for the answers @tus/server writes without an error (a bad header, no Tus-Resumable). */
const CODE_OF_STATUS: Record<number, ErrorCode> = {
  400: 'INVALID_TUS_REQUEST',
  404: 'NOT_FOUND',
  412: 'TUS_VERSION_UNSUPPORTED',
};

/** @tus/server's own errors are `{status_code, body}`: give them a code and diskport's shape. */
function toTusApiError(err: unknown): ApiError {
  const name = (Object.keys(TUS_ERRORS) as TusErrorName[]).find((k) => TUS_ERRORS[k] === err);
  if (!name) return toApiError(err);
  const code = CODE_OF_TUS_ERROR[name];
  return code === 'INTERNAL_ERROR' ? toApiError(err) : new ApiError(code, TUS_ERRORS[name].body.trim());
}

export function tusRoutes(s: Services): Router {
  const store = new TransferTusStore(s.transfers);
  const tus = new Server({
    path: TUS_PATH,
    datastore: store,
    // The API is for clients with the bearer token, not for browsers of other origins.
    allowedOrigins: () => false,
    async onUploadFinish(_req, upload) {
      const task = await store.commit(upload.id);
      return { headers: { 'X-Task-Id': task.id } };
    },
    onResponseError(_req, err) {
      const context = tusRequest.getStore();
      if (context) context.error = err;
      const e = toTusApiError(err);
      return { status_code: e.status, body: JSON.stringify(toErrorBody(e, context?.requestId)) };
    },
  });

  return Router().all(`${TUS_PATH}{/:id}`, async (req, res) => {
    res.setHeader('Tus-Resumable', TUS_RESUMABLE);
    checkTusFraming(req);
    const checksum = req.get('upload-checksum');
    const context: TusRequestContext = {
      digest: checksum ? parseUploadChecksum(checksum) : undefined,
      requestId: String(req.id),
    };
    const answer = await tusRequest.run(context, () => tus.handleWeb(new NodeRequest({ req, res })));
    if (answer.status >= 500) req.log?.error({ err: context.error }, 'tus request failed');
    await send(req, res, answer);
  });
}

const TUS_BODY_TYPE = 'application/offset+octet-stream';

/**
 * What tus 1.0 answers and @tus/server does not: a request without
 * Tus-Resumable 1.0.0 is 412 with Tus-Version (@tus/server says 400 to
 * another version), and a PATCH body of another Content-Type is 415 (it says
 * 400). OPTIONS needs no version; GET is no tus method.
 */
function checkTusFraming(req: Request): void {
  if (req.method === 'OPTIONS' || req.method === 'GET') return;
  const version = req.get('tus-resumable');
  if (version !== TUS_RESUMABLE) {
    throw new ApiError(
      'TUS_VERSION_UNSUPPORTED',
      version === undefined
        ? `the request has no Tus-Resumable header; send Tus-Resumable: ${TUS_RESUMABLE}`
        : `Tus-Resumable '${version}' is not a version diskport speaks; send Tus-Resumable: ${TUS_RESUMABLE}`,
      { supported: [TUS_RESUMABLE] },
      { 'Tus-Version': TUS_RESUMABLE },
    );
  }
  const type = req.get('content-type');
  if (req.method === 'PATCH' && type !== TUS_BODY_TYPE) {
    throw new ApiError(
      'UNSUPPORTED_MEDIA_TYPE',
      `a tus PATCH body is sent as Content-Type: ${TUS_BODY_TYPE}${type === undefined ? '' : `, not '${type}'`}`,
    );
  }
}

/** Writes @tus/server's answer; errors become `{"error": {...}}` JSON like every other endpoint's. */
async function send(req: Request, res: ExpressResponse, answer: globalThis.Response): Promise<void> {
  const headers = new Headers(answer.headers);
  // CORS is off (allowedOrigins), so @tus/server's Access-Control-* headers would only be noise.
  for (const name of [...headers.keys()]) if (name.startsWith('access-control-')) headers.delete(name);
  if (req.method === 'OPTIONS') headers.set('Tus-Checksum-Algorithm', TUS_CHECKSUM_ALGORITHMS.join(','));
  let body: Buffer | null = Buffer.from(await answer.arrayBuffer());
  if (body.length === 0) {
    body = null;
    headers.delete('Content-Type'); // the '' bodies of @tus/server's answers are no text
  }
  if (answer.status >= 400) {
    const text = body?.toString() ?? '';
    const json = text.startsWith('{"error"')
      ? text
      : JSON.stringify(
          toErrorBody(new ApiError(CODE_OF_STATUS[answer.status] ?? 'INVALID_TUS_REQUEST', text.trim())),
        );
    body = Buffer.from(json);
    headers.set('Content-Type', 'application/json; charset=utf-8');
    headers.set('Content-Length', String(body.length));
    if (!req.complete) headers.set('Connection', 'close');
  }
  res.status(answer.status);
  headers.forEach((value, name) => {
    res.setHeader(name, value);
  });
  if (body) res.end(body);
  else res.end();
}
