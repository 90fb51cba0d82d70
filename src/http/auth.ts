/** Bearer-token check for management calls, when the service has a token. */
import type { RequestHandler } from 'express';
import { ApiError } from '../errors.js';
import { safeEqual } from '../secrets.js';

/** Why an Authorization header does not authorize a management call; undefined when it does. */
export function tokenRefusal(header: string | undefined, token: string | undefined): ApiError | undefined {
  if (!token) return undefined;
  if (!header) {
    return new ApiError('TOKEN_REQUIRED', 'this call needs a token: send Authorization: Bearer <token>');
  }
  const match = /^Bearer\s+(.+)$/i.exec(header);
  if (!match || !safeEqual(match[1].trim(), token)) {
    return new ApiError('TOKEN_INVALID', 'the bearer token is not valid for this service');
  }
  return undefined;
}

export function requireToken(token: string | undefined): RequestHandler {
  return (req, res, next) => {
    // Already authorized by a transfer's own token (see transfer-auth.ts).
    if (res.locals.transfer) return next();
    // Or by an incoming migration's credential, for that migration's routes (routes/migrations.ts).
    if (res.locals.migration) return next();
    if (!token) return next();
    const refusal = tokenRefusal(req.get('authorization'), token);
    if (refusal) return next(refusal);
    res.locals.managementAuthorized = true;
    next();
  };
}
