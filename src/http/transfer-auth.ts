/**
 * Transfer tokens: the holder of a transfer's URL may use that transfer (its
 * data, state, finalize and cancel) and nothing else, until it expires, and
 * never needs the management token.
 */
import type { RequestHandler } from 'express';
import { ApiError } from '../errors.js';
import { safeEqual } from '../secrets.js';
import type { TransferService } from '../transfer/sessions.js';

/** The transfer token a request presents: `?token=`, else a bearer token that is not the management token. */
export function presentedToken(query: unknown, authorization: string | undefined, managementToken?: string) {
  if (typeof query === 'string' && query !== '') return query;
  const bearer = /^Bearer\s+(.+)$/i.exec(authorization ?? '')?.[1]?.trim();
  if (bearer && !(managementToken && safeEqual(bearer, managementToken))) return bearer;
  return undefined;
}

/** Mounted on /v1/transfers/:id: a valid transfer token authorizes the request on its own. */
export function transferTokenAuth(transfers: TransferService, managementToken?: string): RequestHandler {
  return (req, res, next) => {
    const token = presentedToken(req.query.token, req.get('authorization'), managementToken);
    if (!token) return next();
    const transfer = transfers.get(req.params.id as string);
    if (!transfers.tokenMatches(transfer, token)) {
      return next(new ApiError('TOKEN_INVALID', 'this token is not valid for this transfer'));
    }
    if (transfers.isExpired(transfer)) {
      return next(
        new ApiError('TRANSFER_EXPIRED', `the transfer expired at ${transfer.expires_at}; open a new one`),
      );
    }
    res.locals.transfer = transfer;
    next();
  };
}

/** Data endpoints always need a credential: the transfer's token, or the management token when one is set. */
export function requireTransferCredential(managementToken?: string): RequestHandler {
  return (_req, res, next) => {
    if (res.locals.transfer || (managementToken && res.locals.managementAuthorized)) return next();
    next(
      new ApiError(
        'TOKEN_REQUIRED',
        "this transfer's data needs its token: use the url returned when the transfer was created (it carries ?token=)",
      ),
    );
  };
}
