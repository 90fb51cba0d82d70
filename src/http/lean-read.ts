/**
 * A single-range GET or a HEAD of a VDI's export, answered from the export
 * layout the image cache keeps per generation (ImageCache.ready): headers
 * from the VDI's row, the body filled into one pooled buffer and written with
 * the headers in one go. No source object, plan or generator per request.
 *
 * Taken only for what it answers exactly as sendExport would: a HEAD, or a
 * GET of one satisfiable range under a MiB (larger ranges go out with
 * sendfile where the disk lies in files, else on the stream path), no
 * If-None-Match, an If-Range only when it names the current ETag, and a VDI whose image and layout are open already
 * (the first read opens them through the stream path). Anything else says
 * false and is served by sendExport.
 *
 * The same for the routes that serve an export through sendExport once
 * their own checks have passed (a download session's url, an imageio read
 * ticket, xapi's /export_raw_vdi): `leanReadWithin` answers as sendExport
 * would for them, a session's bytes counted toward its task.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { giveBack, takeBuffer } from '../image/buffer-pool.js';
import type { ReadyExport } from '../storage/image-cache.js';
import type { VdiStore } from '../storage/vdis.js';
import type { ReadCounters } from '../transfer/export.js';
import { exportHeaders, fillPieces } from '../transfer/ranged-read.js';
import { answerError } from './errors.js';
import type { SessionExport } from './send-export.js';
import { ZERO_COPY_MIN_BYTES } from './zero-copy.js';

export interface LeanReadDeps {
  vdis: VdiStore;
  reads: ReadCounters;
}

/** Bodies of this size or more take the stream path (sendfile where the disk lies in files). */
const MAX_LEAN_BODY_BYTES = ZERO_COPY_MIN_BYTES;
const SINGLE_RANGE = /^bytes=(\d{0,15})-(\d{0,15})$/;

/** A Range of one satisfiable range (as range-parser reads it, suffixes clamped), else undefined. */
function singleRange(value: string, size: number): { start: number; end: number } | undefined {
  const m = SINGLE_RANGE.exec(value);
  if (!m || size === 0) return;
  if (m[1] === '') {
    const n = m[2] === '' ? 0 : Number(m[2]);
    return n > 0 ? { start: Math.max(0, size - n), end: size - 1 } : undefined;
  }
  const start = Number(m[1]);
  const end = m[2] === '' ? size - 1 : Math.min(Number(m[2]), size - 1);
  return start < size && start <= end ? { start, end } : undefined;
}

/** Serves the request and says true, or says false (nothing done) for sendExport to serve it. */
export function leanRead(
  deps: LeanReadDeps,
  req: IncomingMessage,
  res: ServerResponse,
  vdiId: string,
  format: string,
): boolean {
  return serve(deps, req, res, vdiId, format, undefined, (err) => answerError(err, req, res), noop);
}

function noop(): void {}

/**
 * leanRead inside a route that would call sendExport(deps, req, res, vdiId,
 * format, session): undefined when the request is not one it answers
 * (nothing done), else a promise that settles once the answer is written,
 * or rejects before any header with what the route's error handler answers
 * (as sendExport rejects). A session's task counts the bytes, and a failed
 * read is the session's to judge, as there.
 */
export function leanReadWithin(
  deps: LeanReadDeps,
  req: IncomingMessage,
  res: ServerResponse,
  vdiId: string,
  format: string,
  session?: SessionExport,
): Promise<void> | undefined {
  let settle!: (err: unknown) => void;
  const answered = new Promise<void>((resolve, reject) => {
    settle = (err) => (err ? reject(err) : resolve());
  });
  const failed = (err: unknown) => {
    session?.onReadFailed(err);
    settle(err);
  };
  return serve(deps, req, res, vdiId, format, session, failed, () => settle(null)) ? answered : undefined;
}

function serve(
  deps: LeanReadDeps,
  req: IncomingMessage,
  res: ServerResponse,
  vdiId: string,
  format: string,
  session: SessionExport | undefined,
  failed: (err: unknown) => void,
  sent: () => void,
): boolean {
  const h = req.headers;
  const head = req.method === 'HEAD';
  const rangeHeader = h.range;
  if (h['if-none-match'] !== undefined || (!head && rangeHeader === undefined)) return false;
  let ready: ReadyExport | undefined;
  try {
    ready = deps.vdis.images.ready(vdiId, format);
  } catch {
    return false; // an unknown VDI: sendExport answers
  }
  if (!ready) return false;
  const { serialized } = ready;
  const size = serialized.size;
  const headers = exportHeaders(ready.vdi, format);
  const range = rangeHeader === undefined ? undefined : singleRange(rangeHeader, size);
  const ifRange = h['if-range'];
  if (
    (rangeHeader !== undefined && !range) ||
    (ifRange !== undefined &&
      (range === undefined || typeof ifRange !== 'string' || ifRange.trim() !== headers.etag)) ||
    (range && !head && (range.end - range.start + 1 >= MAX_LEAN_BODY_BYTES || !serialized.pieces))
  ) {
    ready.release();
    return false;
  }
  const setHeaders = () => {
    res.setHeader('ETag', headers.etag);
    res.setHeader('Last-Modified', headers.lastModified);
    res.setHeader('Accept-Ranges', 'bytes');
    res.statusCode = range ? 206 : 200;
    res.setHeader('Content-Length', String(range ? range.end - range.start + 1 : size));
    res.setHeader('Content-Disposition', headers.disposition);
    res.setHeader('Content-Type', 'application/octet-stream');
    if (range) res.setHeader('Content-Range', `bytes ${range.start}-${range.end}/${size}`);
  };
  if (head || !range) {
    ready.release();
    setHeaders();
    res.end();
    sent();
    return true;
  }
  const length = range.end - range.start + 1;
  const buf = takeBuffer(length);
  const body = buf.subarray(0, length);
  const held = ready;
  fillPieces(held.image, serialized.pieces!(range.start, range.end + 1), body, (err) => {
    held.release();
    if (err) {
      giveBack(buf);
      failed(err);
      return;
    }
    if (res.destroyed) {
      giveBack(buf);
      sent();
      return;
    }
    setHeaders();
    if (session) {
      res.setHeader('X-Task-Id', session.taskId);
      res.end(body, () => giveBack(buf));
      session.onBytes(length);
    } else {
      deps.reads.countRequest(format);
      res.end(body, () => giveBack(buf));
      deps.reads.countBytes(format, length);
    }
    sent();
  });
  return true;
}
