/**
 * Serving a representation with RFC 9110 semantics: validators (ETag,
 * Last-Modified), conditionals (If-None-Match, If-Range), and byte ranges
 * (single, suffix, open-ended, multiple as multipart/byteranges, 416).
 * Parsing of the Range header itself is range-parser's job.
 */
import { randomBytes } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import rangeParser from 'range-parser';
import { ApiError } from '../errors.js';
import type { SendSpan } from '../formats/types.js';
import { sendSpans, ZERO_COPY_MIN_BYTES, zeroCopySocketFd } from './zero-copy.js';

export interface Representation {
  size: number;
  etag: string;
  lastModified: Date;
  contentType: string;
  filename: string;
  read(start: number, end: number): AsyncIterable<Buffer>;
  /** The bytes of [start, end) as batches of spans, where the disk's lie in files as they are (see zero-copy.ts). */
  spans?(start: number, end: number): Iterable<readonly SendSpan[]>;
}

/**
 * Plain Node request and response: express's are these too, and the lean
 * path (src/http/lean.ts) serves hot reads without express.
 */
type Request = IncomingMessage;
type Response = ServerResponse;

/** A request header as one string (express's `req.get`, without its Referer alias). */
function header(req: Request, name: string): string | undefined {
  const v = req.headers[name];
  return Array.isArray(v) ? v.join(', ') : v;
}

/** More ranges than this in one request is abuse, not a resume. */
const MAX_RANGES = 256;

export class ClientGoneError extends ApiError {
  constructor() {
    super('CLIENT_DISCONNECTED', 'the client closed the connection before the response was complete');
  }
}

export interface ResponsePlan {
  status: 200 | 206 | 304;
  /** Ranges to send, inclusive end; one for 200 and single-range 206. */
  ranges: { start: number; end: number }[];
  multipart: boolean;
  bodyLength: number;
}

function etagMatches(header: string, etag: string, weak: boolean): boolean {
  if (header.trim() === '*') return true;
  const bare = (t: string) => (weak ? t.replace(/^W\//, '') : t);
  return header.split(',').some((t) => {
    const tag = t.trim();
    return !(!weak && tag.startsWith('W/')) && bare(tag) === bare(etag);
  });
}

/**
 * If-Range holds only when it names the current strong ETag. A date is not
 * trusted: two commits within one second share a Last-Modified, and a range
 * of one generation spliced onto another would corrupt the client's copy
 * (RFC 9110 lets us send the whole representation instead).
 */
function ifRangeHolds(value: string, rep: Representation): boolean {
  const v = value.trim();
  return (v.startsWith('"') || v.startsWith('W/')) && etagMatches(v, rep.etag, false);
}

/**
 * A suffix longer than the representation asks for all of it (RFC 9110
 * §14.1.3: `bytes=-65536` of a 4 KiB export is the 4 KiB); range-parser 1.x
 * calls it unsatisfiable (2.x, which needs Node 22, fixes it).
 */
function clampSuffixes(range: string, size: number): string {
  const eq = range.indexOf('=');
  if (eq < 0) return range;
  const specs = range
    .slice(eq + 1)
    .split(',')
    .map((spec) => {
      const suffix = /^\s*-\s*(\d+)\s*$/.exec(spec);
      return suffix && Number(suffix[1]) > size ? `-${size}` : spec;
    });
  return `${range.slice(0, eq + 1)}${specs.join(',')}`;
}

/** Decides status and ranges; throws 416 for unsatisfiable ranges. */
export function planResponse(req: Request, rep: Representation, boundary: string): ResponsePlan {
  const full: ResponsePlan = {
    status: 200,
    ranges: rep.size > 0 ? [{ start: 0, end: rep.size - 1 }] : [],
    multipart: false,
    bodyLength: rep.size,
  };
  const inm = header(req, 'if-none-match');
  if (inm && etagMatches(inm, rep.etag, true)) return { ...full, status: 304, ranges: [], bodyLength: 0 };

  const range = header(req, 'range');
  if (!range) return full;
  const ifRange = header(req, 'if-range');
  if (ifRange && !ifRangeHolds(ifRange, rep)) return full;

  const parsed = rangeParser(rep.size, clampSuffixes(range, rep.size), { combine: true });
  if (parsed === -2) return full; // malformed: RFC 9110 says ignore the header
  if (parsed === -1 || parsed.type !== 'bytes' || parsed.length > MAX_RANGES) {
    if (parsed !== -1 && parsed.type !== 'bytes') return full; // a unit we do not know: ignore
    throw new ApiError(
      'RANGE_NOT_SATISFIABLE',
      parsed === -1
        ? `range '${range}' is outside the ${rep.size}-byte representation; ask for bytes 0-${rep.size - 1}`
        : `too many ranges (${parsed.length}); ask for at most ${MAX_RANGES}`,
      { size: rep.size },
      { 'Content-Range': `bytes */${rep.size}` },
    );
  }
  const ranges = parsed.map((r) => ({ start: r.start, end: r.end }));
  if (ranges.length === 1) {
    return { status: 206, ranges, multipart: false, bodyLength: ranges[0].end - ranges[0].start + 1 };
  }
  let bodyLength = Buffer.byteLength(multipartTrailer(boundary));
  for (const r of ranges)
    bodyLength += Buffer.byteLength(partHeader(boundary, rep, r)) + (r.end - r.start + 1);
  return { status: 206, ranges, multipart: true, bodyLength };
}

function partHeader(boundary: string, rep: Representation, r: { start: number; end: number }): string {
  return `\r\n--${boundary}\r\nContent-Type: ${rep.contentType}\r\nContent-Range: bytes ${r.start}-${r.end}/${rep.size}\r\n\r\n`;
}

function multipartTrailer(boundary: string): string {
  return `\r\n--${boundary}--\r\n`;
}

export function setValidators(res: Response, rep: Representation): void {
  res.setHeader('ETag', rep.etag);
  res.setHeader('Last-Modified', rep.lastModified.toUTCString());
  res.setHeader('Accept-Ranges', 'bytes');
}

/** Sends headers for the plan; returns the plan (the caller decides whether to produce a body). */
export function writeHead(
  req: Request,
  res: Response,
  rep: Representation,
): ResponsePlan & { boundary: string } {
  // Only several ranges (a comma in Range) make a multipart body: no random bytes for the others.
  const boundary = header(req, 'range')?.includes(',') ? `diskport-${randomBytes(12).toString('hex')}` : '';
  setValidators(res, rep);
  const plan = planResponse(req, rep, boundary);
  if (plan.status === 304) {
    res.statusCode = 304;
    res.end();
    return { ...plan, boundary };
  }
  res.statusCode = plan.status;
  res.setHeader('Content-Length', String(plan.bodyLength));
  res.setHeader('Content-Disposition', `attachment; filename="${rep.filename}"`);
  if (plan.multipart) {
    res.setHeader('Content-Type', `multipart/byteranges; boundary=${boundary}`);
  } else {
    res.setHeader('Content-Type', rep.contentType);
    if (plan.status === 206) {
      const r = plan.ranges[0];
      res.setHeader('Content-Range', `bytes ${r.start}-${r.end}/${rep.size}`);
    }
  }
  return { ...plan, boundary };
}

/** Writes the planned body, respecting backpressure; `onBytes` counts representation bytes sent. */
export async function writeBody(
  res: Response,
  rep: Representation,
  plan: ResponsePlan & { boundary: string },
  onBytes: (n: number) => void,
  signal?: AbortSignal,
  /** Counts the bytes sent with sendfile (they are in onBytes too). */
  onSendfileBytes?: (n: number) => void,
): Promise<void> {
  const socketFd =
    rep.spans && !plan.multipart && plan.bodyLength >= ZERO_COPY_MIN_BYTES ? zeroCopySocketFd(res) : null;
  for (const r of plan.ranges) {
    if (plan.multipart) await send(res, Buffer.from(partHeader(plan.boundary, rep, r)), signal);
    if (socketFd !== null && rep.spans) {
      const batches = rep.spans(r.start, r.end + 1);
      const count = (n: number) => {
        onBytes(n);
        onSendfileBytes?.(n);
      };
      await sendSpans(res, socketFd, batches, count, () => new ClientGoneError(), signal);
    } else {
      await sendChunks(res, rep.read(r.start, r.end + 1), onBytes, signal);
    }
  }
  if (plan.multipart) await send(res, Buffer.from(multipartTrailer(plan.boundary)), signal);
  await new Promise<void>((resolve, reject) => {
    res.end(() => resolve());
    res.once('close', () => (res.writableFinished ? resolve() : reject(new ClientGoneError())));
  });
}

/**
 * Sends a producer's chunks like `for await`, and hands each chunk the socket
 * has flushed back to the producer with a later `next()`: readVirtual reads
 * into it instead of allocating (producers that ignore the argument are
 * unaffected). Memory stays at a few chunks and the GC has nothing to do.
 */
async function sendChunks(
  res: Response,
  chunks: AsyncIterable<Buffer>,
  onBytes: (n: number) => void,
  signal?: AbortSignal,
): Promise<void> {
  const it = chunks[Symbol.asyncIterator]() as AsyncIterator<Buffer, unknown, Buffer | undefined>;
  const flushed: Buffer[] = [];
  try {
    for (let r = await it.next(); !r.done; r = await it.next(flushed.shift())) {
      const chunk = r.value;
      await send(res, chunk, signal, (err) => {
        if (!err) flushed.push(chunk);
      });
      onBytes(chunk.length);
    }
  } catch (err) {
    await Promise.resolve(it.return?.()).catch(() => {});
    throw err;
  }
}

async function send(
  res: Response,
  chunk: Buffer,
  signal?: AbortSignal,
  onFlushed?: (err?: Error | null) => void,
): Promise<void> {
  if (res.destroyed) throw new ClientGoneError();
  signal?.throwIfAborted();
  if (res.write(chunk, onFlushed)) return;
  await new Promise<void>((resolve, reject) => {
    const done = (err?: Error) => {
      res.off('drain', onDrain);
      res.off('close', onClose);
      signal?.removeEventListener('abort', onAbort);
      if (err) reject(err);
      else resolve();
    };
    const onDrain = () => done();
    const onClose = () => done(new ClientGoneError());
    const onAbort = () => done(signal?.reason);
    res.on('drain', onDrain);
    res.on('close', onClose);
    signal?.addEventListener('abort', onAbort);
  });
}
