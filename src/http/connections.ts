/**
 * Connections that hold a descriptor and do nothing. Node closes a
 * connection whose request has begun but whose headers do not all arrive
 * (headersTimeout), and an idle keep-alive connection (keepAliveTimeout), but
 * one that never sends a byte it keeps forever: enough of them exhaust the
 * descriptors. So a connection gets `firstRequestTimeoutMs` of silence at
 * most before its first request; and past `maxConnections` open at once, a
 * connection's request is answered 503 (with Retry-After) and the connection
 * closed, after a short grace for the request to arrive.
 */
import type { IncomingMessage, Server, ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import { ApiError } from '../errors.js';
import { toErrorBody } from './errors.js';

export interface ConnectionLimits {
  maxConnections: number;
  firstRequestTimeoutMs: number;
}

/** How long a connection beyond the limit may take to send the request that gets its 503. */
const OVER_LIMIT_GRACE_MS = 1000;
const RETRY_AFTER_SECONDS = 1;

export class ConnectionGuard {
  private open = 0;
  private readonly overLimit = new WeakSet<Socket>();
  private readonly started = new WeakSet<Socket>();

  constructor(
    private readonly server: Server,
    private readonly limits: ConnectionLimits,
  ) {
    server.on('connection', (socket: Socket) => this.accept(socket));
  }

  /** Connections open now (those beyond the limit included, until they close). */
  get openConnections(): number {
    return this.open;
  }

  private accept(socket: Socket): void {
    this.open++;
    socket.once('close', () => {
      this.open--;
    });
    let silence = this.limits.firstRequestTimeoutMs;
    if (this.open > this.limits.maxConnections) {
      this.overLimit.add(socket);
      silence = Math.min(silence, OVER_LIMIT_GRACE_MS);
    }
    // No callback: Node's own 'timeout' handler destroys a socket that has no request in flight.
    socket.setTimeout(silence);
  }

  /**
   * Called for each request before the app: true when it was answered here
   * (503, the connection beyond the limit) and the app must not see it.
   */
  refuse(req: IncomingMessage, res: ServerResponse): boolean {
    const socket = req.socket as Socket;
    if (!this.started.has(socket)) {
      this.started.add(socket);
      // The request has come: from now on Node's own timeouts (and the upload idle timeout) apply.
      socket.setTimeout(this.server.timeout || 0);
    }
    if (!this.overLimit.has(socket)) return false;
    const body = JSON.stringify(
      toErrorBody(
        new ApiError(
          'TOO_MANY_CONNECTIONS',
          `diskport has ${this.limits.maxConnections} connections open, its limit (--max-connections); retry in a moment, or reuse a connection`,
          { max_connections: this.limits.maxConnections },
        ),
      ),
    );
    res.shouldKeepAlive = false;
    res.writeHead(503, {
      'Content-Type': 'application/json; charset=utf-8',
      'Content-Length': Buffer.byteLength(body),
      'Retry-After': String(RETRY_AFTER_SECONDS),
    });
    res.end(body);
    return true;
  }
}
