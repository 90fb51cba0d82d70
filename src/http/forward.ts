/**
 * One request passed on to another node as it came: method, path, headers
 * (less the hop-by-hop ones, RFC 9110 §7.6.1) and body, streamed both ways
 * with backpressure, and the answer passed back the same way. Written here
 * because it is a pipe of one request: a proxy library would bring
 * rewriting, retries and websockets, none of which apply.
 */
import http, { type IncomingMessage, type ServerResponse } from 'node:http';

/** Set on a forwarded request: the node that got it never forwards it again (no loops). */
export const FORWARDED_FROM = 'x-diskport-forwarded-from';

const HOP_BY_HOP = new Set([
  'connection',
  'keep-alive',
  'proxy-authenticate',
  'proxy-authorization',
  'proxy-connection',
  'te',
  'trailer',
  'transfer-encoding',
  'upgrade',
  // The client's 100-continue is answered here; the next hop gets the body at once.
  'expect',
]);

/** A node that does not accept the connection within this is unreachable. */
const CONNECT_TIMEOUT_MS = 5_000;
/** A node silent this long before its answer begins (a stopped process) is unreachable too. */
const ANSWER_TIMEOUT_MS = 60_000;

const agent = new http.Agent({ keepAlive: true, maxSockets: 256 });

/** The headers of `raw` (Node's [name, value, ...] list) without the hop-by-hop ones, repeats kept. */
function endToEnd(raw: string[], extra: [string, string][] = []): string[] {
  const kept: string[] = [];
  for (let i = 0; i < raw.length; i += 2) {
    if (!HOP_BY_HOP.has(raw[i].toLowerCase())) kept.push(raw[i], raw[i + 1]);
  }
  for (const [name, value] of extra) kept.push(name, value);
  return kept;
}

/**
 * Passes `req` to `target` (an http URL) and its answer back to `res`.
 * `unreachable` answers the client when no answer began: the node could not be
 * connected to, or fell silent before its status line. Once the answer has
 * begun, a failure cuts the connection, as the node's own failure would.
 */
export function forward(
  req: IncomingMessage,
  res: ServerResponse,
  target: string,
  from: string,
  unreachable: (err: Error) => void,
): void {
  const url = new URL(req.url ?? '/', target);
  const out = http.request(url, {
    method: req.method,
    agent,
    headers: endToEnd(req.rawHeaders, [[FORWARDED_FROM, from]]),
    setHost: false,
  });
  let answered = false;
  const fail = (err: Error) => {
    if (answered) return;
    answered = true;
    out.destroy();
    req.unpipe(out);
    if (res.headersSent) res.destroy(err);
    else unreachable(err);
  };
  out.on('socket', (socket) => {
    if (!socket.connecting) return;
    const timer = setTimeout(
      () => fail(new Error(`no connection to ${target} in ${CONNECT_TIMEOUT_MS} ms`)),
      CONNECT_TIMEOUT_MS,
    );
    socket.once('connect', () => clearTimeout(timer));
    socket.once('close', () => clearTimeout(timer));
  });
  out.setTimeout(ANSWER_TIMEOUT_MS, () =>
    fail(new Error(`${target} gave no answer in ${ANSWER_TIMEOUT_MS} ms`)),
  );
  out.on('error', fail);
  out.on('response', (answer) => {
    answered = true;
    out.setTimeout(0);
    res.writeHead(answer.statusCode ?? 502, answer.statusMessage, endToEnd(answer.rawHeaders));
    answer.pipe(res);
    answer.on('error', (err) => res.destroy(err));
  });
  // The client gone: the node's half of the request ends too.
  res.on('close', () => {
    if (!res.writableFinished) out.destroy();
  });
  if (req.headers.expect?.toLowerCase() === '100-continue') res.writeContinue();
  req.pipe(out);
}
