/** Bearer-token check for management calls, when the service has a token. */
import type { RequestHandler } from 'express';
import { ApiError } from '../errors.js';
import { safeEqual } from '../secrets.js';

export function requireToken(token: string | undefined): RequestHandler {
  return (req, res, next) => {
    // Already authorized by a transfer's own token (see transfer-auth.ts).
    if (res.locals.transfer) return next();
    if (!token) return next();
    const header = req.get('authorization');
    if (!header) {
      return next(
        new ApiError('TOKEN_REQUIRED', 'this call needs a token: send Authorization: Bearer <token>'),
      );
    }
    const match = /^Bearer\s+(.+)$/i.exec(header);
    if (!match || !safeEqual(match[1].trim(), token)) {
      return next(new ApiError('TOKEN_INVALID', 'the bearer token is not valid for this service'));
    }
    res.locals.managementAuthorized = true;
    next();
  };
}
