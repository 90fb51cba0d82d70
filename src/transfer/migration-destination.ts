/**
 * The source's client of a destination diskport's /v1/migrations/{id}, with
 * the receive token's credential only. Requests that fail for a reason that
 * may pass (the destination restarting, a broken connection, a 5xx) are
 * retried with backoff while the migration waits: a destination killed and
 * restarted finds the source coming back (the write tickets it held survive
 * its restart, and say what they hold).
 */
import type { Logger } from 'pino';
import type { Dispatcher } from 'undici';
import { ApiError } from '../errors.js';
import type { ReceiveToken } from './migration-receive.js';
import type { ByteRange } from './range-set.js';
import { backoff, isTransientStatus, type RetryPolicy } from './retry-policy.js';
import { undici } from './undici.js';

/**
 * Attempts in a row that fail before the migration fails (REMOTE_UNAVAILABLE):
 * with delays doubling up to 8 s, a destination has about half a minute to come back.
 */
export const DESTINATION_RETRY: RetryPolicy = {
  retries: 9,
  baseDelayMs: 250,
  maxDelayMs: 8000,
  maxElapsedMs: Number.POSITIVE_INFINITY,
};

/** What a write ticket of the migration holds, as the destination says. */
export interface TicketHolding {
  ticket: string;
  vdi: string;
  /** The ticket's session: `open` takes writes; `finalizing`/`committed` have been finalized. */
  state: string;
  /** The ranges written and durable there, [start, end) pairs. */
  received: ByteRange[];
}

export class Destination {
  private readonly base: string;

  constructor(
    readonly token: ReceiveToken,
    private readonly dispatcher: Dispatcher,
    private readonly logger?: Logger,
  ) {
    // A path prefix of the advertised URL (a proxy's) stays in front of every path.
    this.base = token.url.replace(/\/+$/, '');
  }

  private url(path: string): string {
    return `${this.base}${path}`;
  }

  /** A JSON call under /v1/migrations/{id}; `what` names it in errors. */
  async call<T>(
    method: string,
    path: string,
    what: string,
    body?: unknown,
    signal?: AbortSignal,
  ): Promise<T> {
    const text = await this.request(
      this.url(path),
      method,
      what,
      body === undefined ? undefined : Buffer.from(JSON.stringify(body)),
      body === undefined ? {} : { 'content-type': 'application/json' },
      signal,
      true,
    );
    return (text ? JSON.parse(text) : null) as T;
  }

  /** Writes `data` at `offset` through a ticket (imageio's PUT with a Content-Range; flushed). */
  async write(ticketPath: string, offset: number, data: Buffer, signal: AbortSignal): Promise<void> {
    await this.request(
      this.url(ticketPath),
      'PUT',
      'a write',
      data,
      { 'content-range': `bytes ${offset}-${offset + data.length - 1}/*` },
      signal,
      false,
    );
  }

  /** Zeros a range through a ticket, durably: once answered it counts as held, as a write does. */
  async zero(ticketPath: string, offset: number, size: number, signal: AbortSignal): Promise<void> {
    const body = Buffer.from(JSON.stringify({ op: 'zero', offset, size, flush: true }));
    await this.request(
      this.url(ticketPath),
      'PATCH',
      'a zero',
      body,
      { 'content-type': 'application/json' },
      signal,
      false,
    );
  }

  /** What one of the migration's tickets holds; null when it is gone (expired, removed). */
  async holding(ticket: string, signal: AbortSignal): Promise<TicketHolding | null> {
    try {
      return await this.call<TicketHolding>(
        'GET',
        `/v1/migrations/${this.token.id}/tickets/${ticket}`,
        'the state of a write ticket',
        undefined,
        signal,
      );
    } catch (err) {
      if (err instanceof ApiError && err.code === 'REMOTE_REJECTED' && err.details?.status === 404)
        return null;
      throw err;
    }
  }

  /**
   * Runs `attempt` until it succeeds, retrying what may pass (see
   * `retryable`) with backoff; `DESTINATION_RETRY.retries` failures in a row
   * end it with the last error.
   */
  async retrying<T>(what: string, signal: AbortSignal, attempt: () => Promise<T>): Promise<T> {
    let failures = 0;
    for (;;) {
      try {
        return await attempt();
      } catch (err) {
        if (signal.aborted) throw signal.reason;
        if (!retryable(err)) throw err;
        if (++failures > DESTINATION_RETRY.retries) throw err;
        this.logger?.info(
          { err: (err as Error).message, failures },
          `${what}: the destination failed; trying again`,
        );
        await backoff(DESTINATION_RETRY, failures, signal);
      }
    }
  }

  private async request(
    url: string,
    method: string,
    what: string,
    body: Buffer | undefined,
    headers: Record<string, string>,
    signal: AbortSignal | undefined,
    parseError: boolean,
  ): Promise<string> {
    let res: Dispatcher.ResponseData;
    try {
      res = await undici().request(url, {
        method: method as Dispatcher.HttpMethod,
        dispatcher: this.dispatcher,
        headers: { authorization: `Bearer ${this.token.secret}`, ...headers },
        body,
        signal,
      });
    } catch (err) {
      if (signal?.aborted) throw signal.reason;
      throw new ApiError(
        'REMOTE_UNAVAILABLE',
        `the destination could not be reached for ${what} (${(err as NodeJS.ErrnoException).code ?? 'connection failed'})`,
      );
    }
    let text: string;
    try {
      text = await res.body.text();
    } catch (err) {
      if (signal?.aborted) throw signal.reason;
      throw new ApiError(
        'REMOTE_UNAVAILABLE',
        `the destination broke off ${what} (${(err as NodeJS.ErrnoException).code ?? 'connection closed'})`,
      );
    }
    if (res.statusCode < 300) return text;
    let message = `HTTP ${res.statusCode} ${text.slice(0, 200)}`;
    let code: string | undefined;
    if (parseError) {
      try {
        const e = JSON.parse(text).error;
        code = e.code;
        message = `${e.code}: ${e.message}`;
      } catch {
        // not a diskport error body
      }
    }
    throw new ApiError('REMOTE_REJECTED', `the destination refused ${what}: ${message}`, {
      status: res.statusCode,
      ...(code && { code }),
    });
  }
}

/** A failure that may pass: the destination unreachable or restarting, or a 5xx that is not final. */
export function retryable(err: unknown): boolean {
  if (!(err instanceof ApiError)) return false;
  if (err.code === 'REMOTE_UNAVAILABLE') return true;
  const status = err.details?.status;
  return err.code === 'REMOTE_REJECTED' && typeof status === 'number' && isTransientStatus(status);
}
