/**
 * What ovirt-imageio's /images/ API asks of HTTP (docs/images.md): its
 * request shapes (Content-Range `bytes s-e/*`, PATCH ops) and its answers
 * (403 for a ticket that cannot be used, 416 with `Content-Range: bytes *\/N`,
 * `Content-Range: bytes s-e/*` on a ranged GET).
 */
import type { ErrorRequestHandler, Request, Response } from 'express';
import { ApiError, toApiError } from '../errors.js';
import type { ChunkRange } from '../transfer/sessions.js';
import { contentLengthOf } from './params.js';
import { parseContentRange } from './transfer-headers.js';

/** The session under a ticket ended between its check and the operation: to the client, the ticket is gone. */
const SESSION_ENDED = new Set([
  'TRANSFER_NOT_ACTIVE',
  'TRANSFER_NOT_OPEN',
  'TRANSFER_EXPIRED',
  'TASK_CANCELLED',
]);

export function rangeNotSatisfiable(what: string, size: number): ApiError {
  return new ApiError(
    'RANGE_NOT_SATISFIABLE',
    `${what} exceeds the image size of ${size} bytes; retry with a range inside it`,
    { size },
    { 'Content-Range': `bytes */${size}` },
  );
}

/** Maps diskport's session errors to the statuses imageio clients act on. */
export function imageioErrors(sizeOf: (req: Request) => number | undefined): ErrorRequestHandler {
  return (err, req, _res, next) => {
    const e = toApiError(err);
    if (SESSION_ENDED.has(e.code)) {
      next(
        new ApiError('IMAGEIO_TICKET_FORBIDDEN', `You are not allowed to access this resource: ${e.message}`),
      );
      return;
    }
    const size = sizeOf(req);
    if (e.code === 'CHUNK_PAST_END' && size !== undefined) {
      next(rangeNotSatisfiable('the request', size));
      return;
    }
    next(err);
  };
}

/**
 * The range a PUT writes: the start of `Content-Range: bytes s-e/*` (the
 * length is Content-Length's, as in imageio; the end counts when the body is
 * chunked), or from 0 for a whole image. Undefined for an empty body.
 */
export function putRange(req: Request, size: number): ChunkRange | undefined | 'empty' {
  const length = contentLengthOf(req);
  const header = req.get('content-range');
  let range: ChunkRange | undefined;
  if (header) {
    const r = parseContentRange(header);
    if (r.end < r.start) {
      throw new ApiError(
        'INVALID_CONTENT_RANGE',
        `Content-Range '${header}' names no bytes; send bytes <first>-<last>/*`,
      );
    }
    if (length === 0) return 'empty';
    range = { start: r.start, end: length !== undefined ? r.start + length - 1 : r.end, total: null };
  } else if (length !== undefined) {
    if (length === 0) return 'empty';
    range = { start: 0, end: length - 1, total: null };
  }
  if (range && range.end >= size) {
    throw rangeNotSatisfiable(`bytes ${range.start}-${range.end}`, size);
  }
  return range;
}

export type ImageioPatch = { op: 'flush' } | { op: 'zero'; offset: number; size: number; flush: boolean };

function integerField(body: Record<string, unknown>, name: string, fallback?: number): number {
  const v = body[name];
  if (v === undefined) {
    if (fallback !== undefined) return fallback;
    throw new ApiError('INVALID_REQUEST', `Missing required value for '${name}'`);
  }
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) {
    throw new ApiError(
      'INVALID_REQUEST',
      `Invalid value for '${name}': ${JSON.stringify(v)}; send a byte count`,
    );
  }
  return v;
}

/** A PATCH body: `{"op":"zero","offset","size","flush"}` or `{"op":"flush"}`; 400 for anything else. */
export function parsePatch(body: unknown, imageSize: number): ImageioPatch {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) {
    throw new ApiError('INVALID_REQUEST', 'the PATCH body is a JSON object: {"op": "zero"|"flush", ...}');
  }
  const b = body as Record<string, unknown>;
  if (b.op === undefined) throw new ApiError('INVALID_REQUEST', "Missing required value for 'op'");
  if (b.op === 'flush') return { op: 'flush' };
  if (b.op !== 'zero') {
    throw new ApiError(
      'INVALID_REQUEST',
      `Unsupported operation: ${JSON.stringify(b.op)}; use zero or flush`,
    );
  }
  const size = integerField(b, 'size');
  const offset = integerField(b, 'offset', 0);
  if (b.flush !== undefined && typeof b.flush !== 'boolean') {
    throw new ApiError(
      'INVALID_REQUEST',
      `Invalid value for 'flush': ${JSON.stringify(b.flush)}; send true or false`,
    );
  }
  if (offset + size > imageSize) throw rangeNotSatisfiable(`zero ${offset}+${size}`, imageSize);
  return { op: 'zero', offset, size, flush: b.flush === true };
}

/** A ranged GET answers `Content-Range: bytes s-e/*`, as imageio does (its clients know the size from the ticket). */
export function starTotal(res: Response): void {
  const setHeader = res.setHeader.bind(res);
  res.setHeader = (name: string, value: number | string | readonly string[]) => {
    if (name.toLowerCase() === 'content-range' && typeof value === 'string' && res.statusCode === 206) {
      return setHeader(name, value.replace(/\/\d+$/, '/*'));
    }
    return setHeader(name, value);
  };
}

/** imageio serves one range per GET: several are refused (416), as its clients expect. */
export function assertSingleRange(req: Request, size: number): void {
  const range = req.get('range');
  if (range?.includes(','))
    throw rangeNotSatisfiable('a multi-range request (imageio serves one range per GET)', size);
}
