/**
 * `?limit=` and `?cursor=` on the list routes, and the `Link: <...>;
 * rel="next"` header of a page that is not the last: the body stays a JSON
 * array, and a list that is cut says so in that header.
 */
import type { Request, Response } from 'express';
import { ApiError } from '../errors.js';
import { DEFAULT_PAGE_LIMIT, MAX_PAGE_LIMIT, type Page, type PageRequest } from '../storage/paging.js';

export function pageParams(req: Request): PageRequest {
  const { limit, cursor } = req.query;
  let n = DEFAULT_PAGE_LIMIT;
  if (limit !== undefined) {
    n = typeof limit === 'string' && /^\d+$/.test(limit) ? Number(limit) : Number.NaN;
    if (!(n >= 1 && n <= MAX_PAGE_LIMIT)) {
      throw new ApiError(
        'INVALID_REQUEST',
        `limit must be a whole number from 1 to ${MAX_PAGE_LIMIT}, got '${String(limit)}'`,
      );
    }
  }
  if (cursor !== undefined && (typeof cursor !== 'string' || cursor === '')) {
    throw new ApiError('INVALID_REQUEST', 'cursor must be the value of a next link, given once');
  }
  return { limit: n, cursor: cursor as string | undefined };
}

/** Sends a page's items, with the next page's URL (same filters) when there is one. */
export function sendPage<T>(req: Request, res: Response, page: Page<T>): void {
  if (page.next) {
    const url = new URL(req.originalUrl, 'http://x');
    url.searchParams.set('cursor', page.next);
    res.setHeader('Link', `<${url.pathname}${url.search}>; rel="next"`);
  }
  res.json(page.items);
}
