/** Request parameters shared by the routes that import and export images. */
import type { Request } from 'express';
import { ApiError } from '../errors.js';
import { codecFor } from '../formats/index.js';

/** `?format=`: a wire format's name, raw when absent. */
export function formatParam(req: Request): string {
  return formatValue(req.query.format);
}

/** `?format=`'s value as the query parser gave it (the lean path parses its own query). */
export function formatValue(value: unknown): string {
  const format = typeof value === 'string' && value !== '' ? value : 'raw';
  return codecFor(format).name;
}

/** The declared body length, or undefined when the body is chunked or unannounced. */
export function contentLengthOf(req: Request): number | undefined {
  const header = req.get('content-length');
  if (header === undefined || req.get('transfer-encoding')) return undefined;
  const n = Number(header);
  if (!Number.isSafeInteger(n) || n < 0)
    throw new ApiError('INVALID_REQUEST', `Content-Length '${header}' is not a byte count`);
  return n;
}

/**
 * `?flush=`: ovirt-imageio's y|n (true|false and 1|0 too). n writes a chunk
 * without making it durable; absent means y.
 */
export function flushParam(value: unknown): boolean {
  if (value === undefined || value === '') return true;
  if (value === 'y' || value === 'yes' || value === 'true' || value === '1') return true;
  if (value === 'n' || value === 'no' || value === 'false' || value === '0') return false;
  throw new ApiError('INVALID_REQUEST', `flush must be y or n, got '${String(value)}'`, {
    flush: String(value),
  });
}

/** `?base=`: a snapshot's id (a delta export or import), or undefined when absent. */
export function baseParam(req: Request): string | undefined {
  const base = req.query.base;
  if (base === undefined) return undefined;
  if (typeof base === 'string' && base !== '') return base;
  throw new ApiError('INVALID_REQUEST', 'base must name a snapshot of the VDI (its id)', {
    base: String(base),
  });
}
