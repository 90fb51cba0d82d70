/**
 * The hot reads, served in front of express: ranged GETs and HEADs of
 * /v1/vdis/{vdi}/contents, which qemu's HTTP driver, nbdkit's curl plugin and
 * backup agents send by the thousand. Express's router and its request and
 * response prototypes cost more than the 64 KiB such a request serves (a
 * plain Node server answered about twice the requests/s of the same handler
 * behind express here).
 *
 * Not a second implementation of the route: the same request log and id
 * (the app's pino-http), the same token check, sendExport and error answer
 * as the express route. Only requests whose handling is plain take this
 * path: anything else (another parameter, a repeated one, a percent-encoded
 * id, a body, `Expect`) goes to express, which answers it as ever.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import querystring from 'node:querystring';
import { tokenRefusal } from '../http/auth.js';
import { answerError } from '../http/errors.js';
import { formatValue } from '../http/params.js';
import { sendExport } from '../http/send-export.js';
import type { Services } from '../services.js';

/** The app's request logger (pino-http): it names the request (X-Request-Id) and logs its end. */
export type RequestLogger = (req: IncomingMessage, res: ServerResponse) => void;

const CONTENTS_PATH = /^\/v1\/vdis\/([A-Za-z0-9-]{1,128})\/contents(?:\?(.*))?$/;

/** `?format=X` alone, or no query: the value (empty when absent); undefined for anything else. */
function onlyFormat(query: string | undefined): string | undefined {
  if (query === undefined || query === '') return '';
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

/** Returns a handler that serves the request and says true, or leaves it untouched and says false. */
export function leanRoutes(
  s: Services,
  logRequest: RequestLogger,
): (req: IncomingMessage, res: ServerResponse) => boolean {
  return (req, res) => {
    if (req.method !== 'GET' && req.method !== 'HEAD') return false;
    const m = CONTENTS_PATH.exec(req.url ?? '');
    if (!m || req.headers.expect !== undefined || hasBody(req)) return false;
    const format = onlyFormat(m[2]);
    if (format === undefined) return false;
    logRequest(req, res);
    const refusal = tokenRefusal(req.headers.authorization, s.config.token);
    const served = refusal
      ? Promise.reject(refusal)
      : Promise.resolve().then(() => sendExport(s, req, res, m[1], formatValue(format)));
    served.catch((err) => answerError(err, req, res));
    return true;
  };
}
