/** The one place errors become responses: `{"error": {code, message, details?}}` with the right status. */
import type { ErrorRequestHandler, RequestHandler } from 'express';
import { ApiError } from '../errors.js';

export function toErrorBody(err: ApiError) {
  return { error: err.toJSON() };
}

/** body-parser and friends mark their errors with a `type`. */
function fromExpressError(err: { type?: string; status?: number; message?: string }): ApiError | null {
  switch (err.type) {
    case 'entity.parse.failed':
      return new ApiError(
        400,
        'INVALID_JSON',
        `the request body is not valid JSON (${err.message}); send a JSON object`,
      );
    case 'entity.too.large':
      return new ApiError(
        413,
        'BODY_TOO_LARGE',
        'the JSON body is too large; management requests are small objects',
      );
    case 'encoding.unsupported':
    case 'charset.unsupported':
      return new ApiError(415, 'UNSUPPORTED_MEDIA_TYPE', err.message ?? 'unsupported body encoding');
    default:
      return null;
  }
}

export const notFoundHandler: RequestHandler = (req, _res, next) => {
  next(
    new ApiError(
      404,
      'NOT_FOUND',
      `no such endpoint: ${req.method} ${req.path}; see openapi.yaml for the API`,
    ),
  );
};

export const errorHandler: ErrorRequestHandler = (err, req, res, _next) => {
  const apiError =
    err instanceof ApiError
      ? err
      : (fromExpressError(err) ??
        new ApiError(500, 'INTERNAL_ERROR', 'internal error; the request id is in X-Request-Id'));
  if (apiError.status >= 500) req.log?.error({ err }, 'request failed');
  else req.log?.info({ code: apiError.code, message: apiError.message }, 'request refused');
  if (res.headersSent || res.destroyed) {
    res.destroy();
    return;
  }
  // A refused upload may still be streaming its body: do not keep reading it.
  if (!req.complete) res.setHeader('Connection', 'close');
  for (const [name, value] of Object.entries(apiError.headers)) res.setHeader(name, value);
  res.status(apiError.status).json(toErrorBody(apiError));
};
