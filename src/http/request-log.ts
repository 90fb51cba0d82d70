/**
 * The request log of the hot small requests (src/routes/lean.ts): the same
 * request id, `req.log` and end-of-request line as pino-http gives the other
 * routes, built only when something is logged. pino-http serializes every
 * request's headers into a child logger up front, log line or not: on a
 * 64 KiB ranged GET or chunk PUT that was a tenth of the server's CPU.
 *
 * Their answers below 400 are logged at debug, not info: a backup agent
 * sends them by the thousand a second. `--log-level debug` logs every one;
 * refusals and failures are logged at info and error as for any request.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Logger } from 'pino';

/** Names the request (X-Request-Id) and logs its end. */
export type RequestLogger = (req: IncomingMessage, res: ServerResponse) => void;

/** What pino-http builds the app's request logs with. */
export interface HttpLogger extends RequestLogger {
  /** The logger whose serializers (req, res, err) shape every request line. */
  logger: Logger;
}

const BASE = Symbol('request log base');
const LOG = Symbol('request log');
const STARTED = Symbol('request started');
const LOGGED = Symbol('request end logged');

interface Logged {
  [BASE]?: Logger;
  [LOG]?: Logger;
}

/** `req.log`: the child logger of the request, made on first use (one getter for all requests). */
const lazyLog: PropertyDescriptor = {
  configurable: true,
  enumerable: false,
  get(this: IncomingMessage & Logged) {
    this[LOG] ??= this[BASE]!.child({ req: this });
    return this[LOG];
  },
  set(this: IncomingMessage & Logged, value: Logger) {
    this[LOG] = value;
  },
};

/** The end-of-request line, as pino-http writes it, at the level the answer earns. */
function logEnd(this: ServerResponse & { [STARTED]?: number; [LOGGED]?: boolean }): void {
  if (this[LOGGED]) return;
  this[LOGGED] = true;
  const req = this.req as IncomingMessage & Logged;
  const level = this.statusCode >= 500 ? 'error' : this.statusCode >= 400 ? 'info' : 'debug';
  if (!req[BASE]!.isLevelEnabled(level)) return;
  const responseTime = Date.now() - this[STARTED]!;
  if (this.statusCode >= 500) {
    const err = new Error(`failed with status code ${this.statusCode}`);
    req.log[level]({ res: this, err, responseTime }, 'request errored');
  } else req.log[level]({ res: this, responseTime }, 'request completed');
}

/** The hot requests' logger: `genReqId` names the request as the app's pino-http does. */
export function leanRequestLog(
  http: HttpLogger,
  genReqId: (req: IncomingMessage, res: ServerResponse) => string,
): RequestLogger {
  const base = http.logger;
  return (req, res) => {
    req.id = genReqId(req, res);
    (req as IncomingMessage & Logged)[BASE] = base;
    Object.defineProperty(req, 'log', lazyLog);
    (res as ServerResponse & { [STARTED]?: number })[STARTED] = Date.now();
    res.on('finish', logEnd);
    res.on('close', logEnd);
  };
}
