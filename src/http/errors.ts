/**
 * The one place errors become responses: `{"error": {code, message, details?}}`
 * with the status the registry (src/errors.ts) gives the code. A failure of
 * diskport's own answers a generic message and the request id
 * (`details.request_id`); its cause goes to the log, never to the client.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { ErrorRequestHandler, RequestHandler } from 'express';
import { ApiError, toApiError } from '../errors.js';
import { spaceError } from '../image/space.js';
import { redactSecrets } from './log-redaction.js';

/** The response body; a 5xx names the request id the log files its cause under. */
export function toErrorBody(err: ApiError, requestId?: string) {
  const body = err.toJSON();
  if (err.status >= 500 && requestId) body.details = { ...body.details, request_id: requestId };
  return { error: body };
}

/** What to log for a failure: the cause an INTERNAL_ERROR hides from the client. */
export function logCause(err: unknown): unknown {
  return err instanceof ApiError && err.code === 'INTERNAL_ERROR' && err.cause !== undefined
    ? err.cause
    : err;
}

interface ExpressError {
  type?: string;
  status?: number;
  statusCode?: number;
  expose?: boolean;
  message?: string;
}

/**
 * Errors express and body-parser raise for a bad request carry a 4xx
 * `status` (and body-parser's a `type`); their text is zlib's or the
 * router's, so the message is diskport's own.
 */
function fromExpressError(err: ExpressError): ApiError | null {
  switch (err.type) {
    case 'entity.parse.failed':
      return new ApiError(
        'INVALID_JSON',
        `the request body is not valid JSON (${err.message}); send a JSON object`,
      );
    case 'entity.too.large':
      return new ApiError(
        'BODY_TOO_LARGE',
        'the JSON body is too large; management requests are small objects',
      );
    case 'encoding.unsupported':
      return new ApiError(
        'UNSUPPORTED_MEDIA_TYPE',
        `${err.message ?? 'unsupported body encoding'}; send the body as identity, gzip, deflate or br`,
      );
    case 'charset.unsupported':
      return new ApiError(
        'UNSUPPORTED_MEDIA_TYPE',
        `${err.message ?? 'unsupported charset'}; send the JSON body as UTF-8 (Content-Type: application/json)`,
      );
  }
  const status = err.status ?? err.statusCode;
  if (typeof status !== 'number' || status < 400 || status > 499) return null;
  if (err instanceof URIError) {
    return new ApiError(
      'INVALID_REQUEST',
      'the path holds a malformed percent-encoding (a % not followed by two hex digits of UTF-8); encode ids with encodeURIComponent',
    );
  }
  if (status === 413) return new ApiError('BODY_TOO_LARGE', 'the request body is too large');
  if (status === 415)
    return new ApiError('UNSUPPORTED_MEDIA_TYPE', 'the request body cannot be read as sent');
  return new ApiError(
    'INVALID_REQUEST',
    err.type === undefined
      ? 'the request body cannot be decoded as its Content-Encoding says; send it as identity, or encode it correctly'
      : `the request body could not be read (${err.type}); send it again`,
  );
}

export const notFoundHandler: RequestHandler = (req, _res, next) => {
  next(
    new ApiError('NOT_FOUND', `no such endpoint: ${req.method} ${req.path}; see openapi.yaml for the API`),
  );
};

export const errorHandler: ErrorRequestHandler = (err, req, res, _next) => {
  answerError(err, req, res);
};

/**
 * The error middleware's work, on plain Node objects so the lean path
 * (src/http/lean.ts) answers its errors with the same code. The body is
 * written as express's `res.status().json()` writes it.
 */
export function answerError(err: unknown, req: IncomingMessage, res: ServerResponse): void {
  // spaceError: SQLite's SQLITE_FULL and EDQUOT are a full disk too, with the SR's reserve in the details.
  const apiError =
    err instanceof ApiError ? err : (fromExpressError(err as ExpressError) ?? toApiError(spaceError(err)));
  if (apiError.status >= 500) req.log?.error({ err: logCause(apiError) }, 'request failed');
  else req.log?.info({ code: apiError.code, message: redactSecrets(apiError.message) }, 'request refused');
  if (res.headersSent || res.destroyed) {
    res.destroy();
    return;
  }
  // A refused upload may still be streaming its body: do not keep reading it.
  if (!req.complete) res.setHeader('Connection', 'close');
  for (const [name, value] of Object.entries(apiError.headers)) res.setHeader(name, value);
  const body = JSON.stringify(toErrorBody(apiError, String(req.id ?? '')));
  res.statusCode = apiError.status;
  res.setHeader('Content-Type', 'application/json; charset=utf-8');
  res.setHeader('Content-Length', Buffer.byteLength(body));
  if (req.method === 'HEAD') res.end();
  else res.end(body);
}
