/**
 * A client of diskport's transfer API: push's sender speaks through it to the
 * receiving diskport, and the `diskport` CLI to its server. A transfer is
 * spoken to with its own token (`?token=`), which works for that transfer
 * only; opening one and reading tasks take the management token, if any.
 * A non-2xx answer is an HttpError carrying the server's JSON error; whether
 * it is worth another attempt is retry-policy.ts's business.
 */
import { Readable } from 'node:stream';
import type { Dispatcher } from 'undici';
import type { ByteRange } from './range-set.js';
import { HttpError } from './retry-policy.js';
import { undici } from './undici.js';

/** Where a server is, and how to reach it. */
export interface Endpoint {
  /** The server's base URL, path prefix included (`http://host:8080`, `https://proxy/diskport`). */
  base: URL;
  dispatcher: Dispatcher;
  /** The management token, sent as `Authorization: Bearer` by the calls that need it. */
  token?: string;
  /** Aborts the requests in flight (a cancelled task, Ctrl-C). */
  signal?: AbortSignal;
}

/** A transfer as `GET /v1/transfers/{id}` describes it. */
export interface TransferJson {
  id: string;
  vdi: string;
  direction: 'upload' | 'download';
  format: string;
  size: number | null;
  state: string;
  task_id: string;
  ttl_seconds: number;
  received: ByteRange[];
  data_path: string;
  url?: string;
  token?: string;
}

export interface TaskJson {
  id: string;
  status: 'pending' | 'running' | 'success' | 'failure' | 'cancelled';
  progress: number;
  error: { code: string; message: string } | null;
  result: unknown;
}

export interface Call {
  method: 'GET' | 'PUT' | 'PATCH' | 'POST' | 'DELETE';
  /** Below the base URL, e.g. `/v1/transfers`. */
  path: string;
  query?: Record<string, string>;
  headers?: Record<string, string>;
  /** JSON for an object, as is for bytes; an async iterable is streamed (give its content-length). */
  body?: Buffer | AsyncIterable<Buffer> | Record<string, unknown>;
  /** Send the management token (calls outside a transfer's own URL). */
  management?: boolean;
  /** Per-request deadline for the answer's headers and body. */
  timeoutMs?: number;
  /** Overrides the endpoint's signal (undefined: not aborted). */
  signal?: AbortSignal | null;
}

/** The URL of `path` below the base: only the path and query change, so it never leaves the base's host. */
export function urlOf(ep: Endpoint, path: string, query: Record<string, string> = {}): URL {
  const url = new URL(ep.base);
  url.pathname = `${ep.base.pathname.replace(/\/+$/, '')}${path}`;
  url.search = new URLSearchParams(query).toString();
  if (url.host !== ep.base.host) throw new Error(`refusing to leave ${ep.base.host}`);
  return url;
}

/** Sends a request; resolves with the response of a 2xx (its body unread), throws HttpError otherwise. */
export async function send(ep: Endpoint, call: Call): Promise<Dispatcher.ResponseData> {
  const headers: Record<string, string> = { 'user-agent': 'diskport', ...call.headers };
  let body: Buffer | Readable | string | undefined;
  if (Buffer.isBuffer(call.body)) body = call.body;
  else if (isIterable(call.body)) body = Readable.from(call.body, { objectMode: false });
  else if (call.body !== undefined) {
    body = JSON.stringify(call.body);
    headers['content-type'] ??= 'application/json';
  }
  if (call.management && ep.token) headers.authorization = `Bearer ${ep.token}`;
  const res = await undici().request(urlOf(ep, call.path, call.query), {
    method: call.method,
    headers,
    body,
    dispatcher: ep.dispatcher,
    signal: call.signal === undefined ? ep.signal : (call.signal ?? undefined),
    ...(call.timeoutMs !== undefined && { headersTimeout: call.timeoutMs, bodyTimeout: call.timeoutMs }),
  });
  if (res.statusCode < 200 || res.statusCode >= 300) throw await errorOf(res, `${call.method} ${call.path}`);
  return res;
}

function isIterable(body: Call['body']): body is AsyncIterable<Buffer> {
  return typeof (body as AsyncIterable<Buffer> | undefined)?.[Symbol.asyncIterator] === 'function';
}

/** A JSON call: resolves with the parsed body of a 2xx (null when empty), throws HttpError otherwise. */
export async function callJson<T>(ep: Endpoint, call: Call): Promise<T> {
  const res = await send(ep, { ...call, headers: { accept: 'application/json', ...call.headers } });
  const text = await res.body.text();
  return (text ? JSON.parse(text) : null) as T;
}

/** The error of a response that was not 2xx; reads (and so frees) its body. */
export async function errorOf(res: Dispatcher.ResponseData, what: string): Promise<HttpError> {
  const text = await res.body.text().catch(() => '');
  let code = `HTTP_${res.statusCode}`;
  let message = `${what}: HTTP ${res.statusCode}${text && text.length < 300 ? ` ${text.trim()}` : ''}`;
  let details: Record<string, unknown> | undefined;
  try {
    const body = JSON.parse(text) as {
      error?: { code?: string; message?: string; details?: Record<string, unknown> };
    };
    if (body.error?.message) {
      code = body.error.code ?? code;
      message = body.error.message;
      details = body.error.details;
    }
  } catch {
    // not JSON: keep the status line
  }
  return new HttpError(res.statusCode, code, message, details);
}

/**
 * Opens a transfer (`POST /v1/transfers`, management token). Never aborted
 * by the endpoint's signal: a session the server opened but whose answer was
 * lost would hold its VDI, unknown to anyone.
 */
export async function openTransfer(
  ep: Endpoint,
  body: Record<string, unknown>,
): Promise<{ transfer: TransferJson; session: TransferSession }> {
  const transfer = await callJson<TransferJson>(ep, {
    method: 'POST',
    path: '/v1/transfers',
    body,
    management: true,
    signal: null,
  });
  if (!transfer.token) throw new Error('the server opened a transfer without a token');
  return { transfer, session: new TransferSession(ep, { id: transfer.id, token: transfer.token }) };
}

/** A task (`GET /v1/tasks/{id}`, management token), long-polled up to `waitSeconds`. */
export function getTask(ep: Endpoint, id: string, waitSeconds = 0): Promise<TaskJson> {
  return callJson<TaskJson>(ep, {
    method: 'GET',
    path: `/v1/tasks/${encodeURIComponent(id)}`,
    query: waitSeconds ? { wait: String(waitSeconds) } : {},
    management: true,
  });
}

/** One transfer, spoken to with its own token. */
export class TransferSession {
  constructor(
    readonly ep: Endpoint,
    readonly ref: { id: string; token: string },
  ) {}

  get id(): string {
    return this.ref.id;
  }

  private path(sub: string): string {
    return `/v1/transfers/${encodeURIComponent(this.ref.id)}${sub}`;
  }

  private call<T>(call: Omit<Call, 'path'> & { sub: string }): Promise<T> {
    const { sub, query, ...rest } = call;
    return callJson<T>(this.ep, {
      ...rest,
      path: this.path(sub),
      query: { token: this.ref.token, ...query },
    });
  }

  /** What the server holds: state, size, `received` ranges. */
  state(): Promise<TransferJson> {
    return this.call({ method: 'GET', sub: '' });
  }

  /** Fixes the upload's length without a byte (`Content-Range: bytes *\/total`). */
  declareTotal(total: number): Promise<unknown> {
    return this.call({ method: 'PUT', sub: '/data', headers: { 'content-range': `bytes */${total}` } });
  }

  /** Writes `data` at `start` of a stream of `total` bytes. */
  put(start: number, data: Buffer, total: number): Promise<void> {
    return this.putStream(start, data.length, data, total);
  }

  /**
   * Streams the `length` bytes `data` yields to [start, start + length) of a
   * stream of `total` bytes, in one request: the receiver writes them as they
   * arrive and keeps what arrived if the connection breaks.
   */
  async putStream(
    start: number,
    length: number,
    data: Buffer | AsyncIterable<Buffer>,
    total: number,
  ): Promise<void> {
    const res = await send(this.ep, {
      method: 'PUT',
      path: this.path('/data'),
      query: { token: this.ref.token },
      headers: {
        'content-type': 'application/octet-stream',
        'content-range': `bytes ${start}-${start + length - 1}/${total}`,
        'content-length': String(length),
      },
      body: data,
    });
    await res.body.dump();
  }

  /** Says that [start, end) reads as zeros, without sending them (ovirt-imageio's zero op). */
  zero(start: number, end: number): Promise<TransferJson> {
    return this.call({
      method: 'PATCH',
      sub: '/data',
      body: { op: 'zero', offset: start, size: end - start },
    });
  }

  /** Commits the upload; the answer is its task, long-polled up to `waitSeconds`. */
  finalize(waitSeconds: number): Promise<TaskJson> {
    return this.call({ method: 'POST', sub: '/finalize', query: { wait: String(waitSeconds) } });
  }

  /** A ranged read of a download (the response unread, for streaming). */
  read(headers: Record<string, string>): Promise<Dispatcher.ResponseData> {
    return send(this.ep, {
      method: 'GET',
      path: this.path('/data'),
      query: { token: this.ref.token },
      headers,
    });
  }

  /** Ends the transfer (`DELETE`); the VDI stays as it was. */
  async cancel(opts: { timeoutMs?: number } = {}): Promise<void> {
    const res = await send(this.ep, {
      method: 'DELETE',
      path: this.path(''),
      query: { token: this.ref.token },
      timeoutMs: opts.timeoutMs,
      signal: null,
    });
    await res.body.dump();
  }
}
