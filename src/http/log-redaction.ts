/**
 * Secrets never reach the log. A request carries them in three places: the
 * Authorization header (bearer token, Basic password), the query string (a
 * transfer's `?token=`, xapi's `session_id`, presigned URLs' signatures) and,
 * echoed back, a message quoting a URL it was given. The request serializer
 * and the refusal log pass through these before anything is written.
 */

import { type DestinationStream, type Logger, pino, stdSerializers } from 'pino';

const REDACTED = '[REDACTED]';

/** Query parameters whose values are credentials (compared case-insensitively). */
const SECRET_PARAMS = [
  'token',
  'session_id',
  'access_token',
  'password',
  'sig',
  'signature',
  'x-amz-signature',
  'x-amz-credential',
  'x-amz-security-token',
  'x-goog-signature',
  'x-goog-credential',
];
const SECRET_HEADERS = ['authorization', 'proxy-authorization', 'cookie', 'set-cookie'];

const PARAM_PATTERN = new RegExp(`([?&;](?:${SECRET_PARAMS.join('|')})=)[^&#;\\s'"]*`, 'gi');
const USERINFO_PATTERN = /(\b[a-z][a-z0-9+.-]*:\/\/)[^/@\s'"]*@/gi;
const AUTH_SCHEME_PATTERN = /\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+/g;

/** Text with every credential it quotes (query values, URL userinfo, Authorization values) replaced. */
export function redactSecrets(text: string): string {
  return text
    .replace(PARAM_PATTERN, `$1${REDACTED}`)
    .replace(USERINFO_PATTERN, `$1${REDACTED}@`)
    .replace(AUTH_SCHEME_PATTERN, `$1 ${REDACTED}`);
}

function redactHeaders(headers: unknown): unknown {
  if (!headers || typeof headers !== 'object') return headers;
  const out: Record<string, unknown> = { ...(headers as Record<string, unknown>) };
  for (const name of Object.keys(out)) {
    if (SECRET_HEADERS.includes(name.toLowerCase())) out[name] = REDACTED;
    else if (typeof out[name] === 'string') out[name] = redactSecrets(out[name] as string);
  }
  return out;
}

function redactQuery(query: unknown): unknown {
  if (!query || typeof query !== 'object') return query;
  const out: Record<string, unknown> = { ...(query as Record<string, unknown>) };
  for (const name of Object.keys(out)) if (SECRET_PARAMS.includes(name.toLowerCase())) out[name] = REDACTED;
  return out;
}

interface SerializedRequest {
  url?: string;
  query?: unknown;
  headers?: unknown;
  [key: string]: unknown;
}

/** pino-http's request serializer, wrapped: the logged request keeps no credential. */
export function redactRequest(req: SerializedRequest): SerializedRequest {
  // pino-std-serializers' object keeps the raw request behind a non-enumerable `raw`: keep it so.
  const out = Object.create(
    Object.getPrototypeOf(req),
    Object.getOwnPropertyDescriptors(req),
  ) as SerializedRequest;
  if (typeof req.url === 'string') out.url = redactSecrets(req.url);
  out.query = redactQuery(req.query);
  out.headers = redactHeaders(req.headers);
  return out;
}

interface SerializedResponse {
  headers?: unknown;
  [key: string]: unknown;
}

/** The response's headers may echo a URL with its token (Location): redacted the same way. */
export function redactResponse(res: SerializedResponse): SerializedResponse {
  const out = Object.create(
    Object.getPrototypeOf(res),
    Object.getOwnPropertyDescriptors(res),
  ) as SerializedResponse;
  out.headers = redactHeaders(res.headers);
  return out;
}

interface SerializedError {
  message?: unknown;
  stack?: unknown;
  [key: string]: unknown;
}

/** An error's text may quote a URL it failed on (a push's target, with its token). */
export function redactError(err: SerializedError): SerializedError {
  if (!err || typeof err !== 'object') return err;
  const out = { ...err };
  if (typeof out.message === 'string') out.message = redactSecrets(out.message);
  if (typeof out.stack === 'string') out.stack = redactSecrets(out.stack);
  return out;
}

/** diskport's logger: pino JSON, whose errors keep no credential (requests: see redactRequest). */
export function createLogger(level: string, destination?: DestinationStream): Logger {
  return pino({ level, serializers: { err: (e: Error) => redactError(stdSerializers.err(e)) } }, destination);
}
