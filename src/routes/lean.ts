/**
 * The hot small requests, served in front of express: ranged GETs and HEADs
 * of /v1/vdis/{vdi}/contents, which qemu's HTTP driver, nbdkit's curl plugin
 * and backup agents send by the thousand, and chunk PUTs into an upload
 * session (`PUT /v1/transfers/{id}/data` with Content-Range), which
 * imageio-style clients send 64 KiB at a time. Express's router and its
 * request and response prototypes cost more than the 64 KiB such a request
 * carries (a plain Node server answered about twice the requests/s of the
 * same handler behind express here).
 *
 * Not a second implementation of the routes: the same request id and log
 * lines (src/http/request-log.ts; a success at debug), the same token checks, sendExport, session write and
 * error answer as the express routes. Only requests whose handling is plain
 * take this path, decided before anything is read: anything else (another
 * parameter, a repeated one, a percent-encoded id, a body on a read, a chunk
 * PUT that a check would refuse, a digest) goes to express, which answers it
 * as ever, so a refusal is express's own answer.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import querystring from 'node:querystring';
import { tokenRefusal } from '../http/auth.js';
import { UPLOAD_IDLE_TIMEOUT_MS } from '../http/continue.js';
import { answerError } from '../http/errors.js';
import { leanRead } from '../http/lean-read.js';
import { flushParam, formatValue } from '../http/params.js';
import type { RequestLogger } from '../http/request-log.js';
import { sendExport } from '../http/send-export.js';
import { presentedToken } from '../http/transfer-auth.js';
import { parseContentRange } from '../http/transfer-headers.js';
import type { Extent } from '../image/block-image.js';
import type { Services } from '../services.js';
import type { ChunkRange } from '../transfer/sessions.js';

const CONTENTS_PATH = /^\/v1\/vdis\/([A-Za-z0-9-]{1,128})\/contents(?:\?(.*))?$/;

const EXTENTS_PATH = /^\/v1\/vdis\/([A-Za-z0-9-]{1,128})\/extents(?:\?context=zero)?$/;

/** Each generation's extents as the express route answers them (extents are kept per generation). */
const extentsJson = new WeakMap<readonly Extent[], Buffer>();

/**
 * `GET /v1/vdis/{vdi}/extents` (or `?context=zero`) of a VDI whose extents
 * are computed already: the JSON kept for that generation's extents. Said
 * false before anything is done otherwise (express computes and answers).
 */
function leanExtents(
  s: Services,
  req: IncomingMessage,
  res: ServerResponse,
  logRequest: RequestLogger,
): boolean {
  const m = EXTENTS_PATH.exec(req.url ?? '');
  if (!m || req.headers.expect !== undefined || hasBody(req)) return false;
  if (tokenRefusal(req.headers.authorization, s.config.token)) return false;
  let extents: readonly Extent[] | undefined;
  try {
    extents = s.vdis.images.readyExtents(m[1]);
  } catch {
    return false; // an unknown VDI: express answers
  }
  if (!extents) return false;
  let body = extentsJson.get(extents);
  if (!body) {
    body = Buffer.from(
      JSON.stringify(extents.map((e) => ({ start: e.start, length: e.length, zero: e.zero }))),
    );
    extentsJson.set(extents, body);
  }
  logRequest(req, res);
  res.setHeader('Content-Type', 'application/json; charset=utf-8');
  res.setHeader('Content-Length', body.length);
  res.end(body);
  return true;
}

const PLAIN_FORMAT = /^format=([a-z0-9]+)$/;

/** `?format=X` alone, or no query: the value (empty when absent); undefined for anything else. */
function onlyFormat(query: string | undefined): string | undefined {
  if (query === undefined || query === '') return '';
  // The usual query, without querystring's object.
  const plain = PLAIN_FORMAT.exec(query);
  if (plain) return plain[1];
  const parsed = querystring.parse(query);
  let format: string | undefined;
  for (const name in parsed) {
    const value = parsed[name];
    if (name !== 'format' || typeof value !== 'string') return undefined;
    format = value;
  }
  return format;
}

/** Requests with a body are express's: its JSON parser reads them. */
function hasBody(req: IncomingMessage): boolean {
  const length = req.headers['content-length'];
  return req.headers['transfer-encoding'] !== undefined || (length !== undefined && length !== '0');
}

const DATA_PATH = /^\/v1\/transfers\/([A-Za-z0-9-]{1,128})\/data(?:\?(.*))?$/;

/**
 * `?token=` and `?flush=` of a chunk PUT, as querystring.parse reads them;
 * undefined when anything else is there, or either comes twice (express
 * answers). The usual query (nothing percent-encoded) without building
 * querystring's object.
 */
function chunkQuery(query: string): { token?: string; flush?: string } | undefined {
  const q: { token?: string; flush?: string } = {};
  if (query.includes('%') || query.includes('+')) {
    const parsed = querystring.parse(query);
    for (const name in parsed) {
      const value = parsed[name];
      if (typeof value !== 'string' || (name !== 'token' && name !== 'flush')) return;
      q[name] = value;
    }
    return q;
  }
  for (const piece of query.split('&')) {
    if (piece === '') continue;
    const eq = piece.indexOf('=');
    const name = eq < 0 ? piece : piece.slice(0, eq);
    if ((name !== 'token' && name !== 'flush') || q[name] !== undefined) return;
    q[name] = eq < 0 ? '' : piece.slice(eq + 1);
  }
  return q;
}

/** A chunk PUT the lean path takes: its session, range and flush. */
interface Chunk {
  id: string;
  range: ChunkRange;
  flush: boolean;
}

/**
 * The chunk a PUT carries when every check the express route makes passes
 * (else undefined, for express to answer): `?token=` (and `?flush=`) or a
 * bearer token of an active, unexpired upload session, held in memory; a
 * Content-Range of at least one byte with a Content-Length of as many; no
 * digest, no JSON, no `Expect` but 100-continue.
 */
function leanChunk(
  s: Services,
  req: IncomingMessage,
  id: string,
  query: string | undefined,
): Chunk | undefined {
  const h = req.headers;
  const contentRange = h['content-range'];
  if (
    contentRange === undefined ||
    h['content-length'] === undefined ||
    h['transfer-encoding'] !== undefined ||
    h['content-digest'] !== undefined ||
    (h.expect !== undefined && h.expect.toLowerCase() !== '100-continue') ||
    h['content-type']?.includes('json')
  ) {
    return;
  }
  const q = query ? chunkQuery(query) : {};
  if (!q) return;
  const presented = presentedToken(q.token, h.authorization, s.config.token);
  const t = presented ? s.transfers.activeSession(id) : undefined;
  if (!presented || !t || t.direction !== 'upload' || t.state !== 'open') return;
  if (!s.transfers.tokenMatches(t, presented) || s.transfers.isExpired(t)) return;
  let flush: boolean;
  let range: ChunkRange;
  try {
    flush = flushParam(q.flush);
    range = parseContentRange(contentRange);
  } catch {
    return;
  }
  if (range.end < range.start || Number(h['content-length']) !== range.end - range.start + 1) return;
  return { id, range, flush };
}

/** Sockets that carried an upload: they end when idle (see continue.ts), one listener each. */
const idleWatched = new WeakSet<Socket>();
function destroyIdle(this: Socket): void {
  this.destroy();
}

/** As express's `res.json()` answers. */
function sendJson(res: ServerResponse, body: unknown): void {
  const text = JSON.stringify(body);
  res.setHeader('Content-Type', 'application/json; charset=utf-8');
  res.setHeader('Content-Length', Buffer.byteLength(text));
  res.end(text);
}

async function putChunk(s: Services, req: IncomingMessage, res: ServerResponse, chunk: Chunk): Promise<void> {
  const after = await s.transfers.write(chunk.id, req, {
    range: chunk.range,
    flush: chunk.flush,
    beforeBody: () => {
      if (req.headers.expect !== undefined && !res.headersSent) res.writeContinue();
    },
  });
  const state = s.transfers.uploadState(after.id);
  res.setHeader('Upload-Offset', String(state.offset));
  if (state.length !== null) res.setHeader('Upload-Length', String(state.length));
  sendJson(res, s.transfers.toJson(after));
}

/** Returns a handler that serves the request and says true, or leaves it untouched and says false. */
export function leanRoutes(
  s: Services,
  logRequest: RequestLogger,
): (req: IncomingMessage, res: ServerResponse) => boolean {
  return (req, res) => {
    if (req.method === 'PUT') {
      const d = DATA_PATH.exec(req.url ?? '');
      const chunk = d ? leanChunk(s, req, d[1], d[2]) : undefined;
      if (!chunk) return false;
      logRequest(req, res);
      // A half-open upload would hold its session forever (continue.ts).
      const socket = req.socket;
      socket.setTimeout(UPLOAD_IDLE_TIMEOUT_MS);
      if (!idleWatched.has(socket)) {
        idleWatched.add(socket);
        socket.on('timeout', destroyIdle);
      }
      putChunk(s, req, res, chunk).catch((err) => answerError(err, req, res));
      return true;
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') return false;
    if (req.method === 'GET' && leanExtents(s, req, res, logRequest)) return true;
    const m = CONTENTS_PATH.exec(req.url ?? '');
    if (!m || req.headers.expect !== undefined || hasBody(req)) return false;
    const format = onlyFormat(m[2]);
    if (format === undefined) return false;
    logRequest(req, res);
    const refusal = tokenRefusal(req.headers.authorization, s.config.token);
    if (!refusal) {
      let codec: string | undefined;
      try {
        codec = formatValue(format);
      } catch {
        // An unknown format: sendExport refuses it.
      }
      if (codec !== undefined && leanRead(s, req, res, m[1], codec)) return true;
    }
    const served = refusal
      ? Promise.reject(refusal)
      : Promise.resolve().then(() => sendExport(s, req, res, m[1], formatValue(format)));
    served.catch((err) => answerError(err, req, res));
    return true;
  };
}
