/**
 * The CLI's HTTP client: one keep-alive undici Agent, JSON helpers, and the
 * server's JSON errors (`{"error": {"code", "message"}}`) as HttpError.
 */
import { Agent, type Dispatcher, request } from 'undici';

/** A finalize may wait up to 300 s for its task before answering. */
const HEADERS_TIMEOUT_MS = 330_000;
const BODY_TIMEOUT_MS = 60_000;
const CONNECT_TIMEOUT_MS = 15_000;

export class HttpError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly details?: Record<string, unknown>,
  ) {
    super(message);
  }
}

export interface Client {
  readonly server: string;
  readonly token?: string;
  readonly agent: Agent;
  /** Bytes of request bodies handed to the network (for the summary). */
  bytesSent: number;
}

export function createClient(server: string, token?: string): Client {
  const agent = new Agent({
    keepAliveTimeout: 10_000,
    headersTimeout: HEADERS_TIMEOUT_MS,
    bodyTimeout: BODY_TIMEOUT_MS,
    connect: { timeout: CONNECT_TIMEOUT_MS },
  });
  return { server: server.replace(/\/+$/, ''), token, agent, bytesSent: 0 };
}

export type Response = Dispatcher.ResponseData;

/** An error from a response that was not 2xx; reads (and so frees) the body. */
export async function errorOf(res: Response, what: string): Promise<HttpError> {
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

export interface JsonRequest {
  method: 'GET' | 'POST' | 'PUT' | 'PATCH' | 'DELETE';
  path: string;
  body?: unknown;
  /** Send the management token (calls outside a transfer's own URL). */
  management?: boolean;
}

/** A JSON call to the server; resolves with the parsed body of a 2xx, throws HttpError otherwise. */
export async function callJson<T>(client: Client, req: JsonRequest): Promise<T> {
  const headers: Record<string, string> = { accept: 'application/json' };
  if (req.body !== undefined) headers['content-type'] = 'application/json';
  if (req.management && client.token) headers.authorization = `Bearer ${client.token}`;
  const res = await request(client.server + req.path, {
    method: req.method,
    headers,
    body: req.body === undefined ? undefined : JSON.stringify(req.body),
    dispatcher: client.agent,
  });
  if (res.statusCode < 200 || res.statusCode >= 300) {
    throw await errorOf(res, `${req.method} ${req.path.split('?')[0]}`);
  }
  return (await res.body.json()) as T;
}

export { request };
