/**
 * Several nodes over one PostgreSQL database: an active session lives in the
 * memory of one node, the one running its task (its open file, the writes
 * not yet flushed, its finalize). A request for it that reaches another node
 * (a load balancer without affinity) is passed to that node, so the chunks of
 * one upload, tus upload or imageio ticket may arrive at any node, in any
 * order, and the finalize too. A holder that cannot be reached is answered
 * 503 NODE_UNREACHABLE with Retry-After: once it is past --node-timeout,
 * another node takes its sessions over and the retry goes there.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { ApiError } from '../errors.js';
import type { Services } from '../services.js';
import { answerError } from './errors.js';
import { FORWARDED_FROM, forward } from './forward.js';

const RETRY_AFTER_SECONDS = 2;

type SessionKey = { transfer: string } | { ticket: string };

/** The paths of one session: its API, its tus upload, its imageio ticket and the ticket's data. */
const SESSION_PATHS: [RegExp, (id: string) => SessionKey][] = [
  [/^\/v1\/transfers\/([^/?#]+)/, (id) => ({ transfer: id })],
  [/^\/v1\/tus\/([^/?#]+)/, (id) => ({ transfer: id })],
  [/^\/images\/([^/?#]+)/, (id) => ({ ticket: id })],
  [/^\/v1\/imageio\/tickets\/([^/?#]+)/, (id) => ({ ticket: id })],
];

function sessionKey(url: string): SessionKey | null {
  for (const [pattern, key] of SESSION_PATHS) {
    const m = pattern.exec(url);
    if (!m) continue;
    try {
      return key(decodeURIComponent(m[1]));
    } catch {
      return null; // a malformed escape: the app refuses it
    }
  }
  return null;
}

/** A handler that forwards a request for another node's session and says true, or says false. */
export function sessionForwarding(
  s: Services,
  logRequest: (req: IncomingMessage, res: ServerResponse) => void,
): (req: IncomingMessage, res: ServerResponse) => boolean {
  // Alone on its store (SQLite), a node holds every session there is.
  if (s.db.soleWriter) return () => false;
  return (req, res) => {
    if (req.headers[FORWARDED_FROM] !== undefined) return false;
    const key = sessionKey(req.url ?? '');
    if (!key) return false;
    // The common case costs no database read: the session is this node's.
    if ('transfer' in key && s.transfers.activeSession(key.transfer)) return false;
    let holder: ReturnType<Services['nodes']['holderOf']>;
    try {
      holder = s.nodes.holderOf(key);
    } catch {
      return false; // the database away: the app answers that itself
    }
    if (!holder || holder.id === s.nodes.id) return false;
    logRequest(req, res);
    // The client holds a session's token or a ticket, not the management
    // token: it is told which node and to retry, never the cluster's
    // internal addresses (those go to the log).
    const refuse = (why: string) =>
      answerError(
        new ApiError(
          'NODE_UNREACHABLE',
          `this session is held by node ${holder.id}, which ${why}; retry in ${RETRY_AFTER_SECONDS} s`,
          { node: holder.id },
          { 'Retry-After': String(RETRY_AFTER_SECONDS) },
        ),
        req,
        res,
      );
    if (!holder.alive || !holder.address) {
      refuse(holder.alive ? 'has not said where it listens yet' : 'is past its heartbeat timeout');
      return true;
    }
    const address = holder.address;
    forward(req, res, address, s.nodes.id, (err) => {
      s.logger.warn(
        { err, node: holder.id, address },
        'cannot forward a request to the node holding its session',
      );
      refuse(`cannot be reached (${(err as NodeJS.ErrnoException).code ?? 'no answer'})`);
    });
    return true;
  };
}
