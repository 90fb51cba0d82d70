/**
 * When a failed request is tried again, and how long to wait before it: one
 * policy for every client of the transfer API (push's sender, the `diskport`
 * CLI) and for pull's fetches.
 *
 * A failure is transient when the same request can succeed later with nobody
 * changing anything: the network's failures (refused, reset, cut, timed out),
 * 408, 429, and 5xx except two that are answers:
 * - 501: the server does not do this; asking again changes nothing.
 * - 507: the server (a push's receiver) is out of space. Someone has to free
 *   space first, and a retry loop of seconds cannot wait for that. The
 *   transfer session stays open on the server, so the same transfer, run
 *   again once there is room, sends only what is missing.
 * Any other 4xx is an answer too, except three codes of the transfer API that
 * speak of one request, not of the transfer: CHUNK_INCOMPLETE and
 * CLIENT_DISCONNECTED (the connection broke under the chunk; what arrived is
 * kept) and TRANSFER_BUSY (writes still landing; finalize again shortly).
 */
import { setTimeout as sleep } from 'node:timers/promises';

/** A server's answer that was not 2xx: its status, and the code and message of its JSON error. */
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

export interface RetryPolicy {
  /** Consecutive failed attempts (none of them made progress) allowed before giving up. */
  retries: number;
  /** First delay; doubles each attempt. */
  baseDelayMs: number;
  /** Largest delay between two attempts. */
  maxDelayMs: number;
  /** Give up when this long has passed without progress. */
  maxElapsedMs: number;
}

/** Pull and push, which run as tasks inside the server: a few seconds of patience, then the task fails. */
export const SERVER_RETRY: RetryPolicy = {
  retries: 5,
  baseDelayMs: 250,
  maxDelayMs: 8000,
  maxElapsedMs: Number.POSITIVE_INFINITY,
};

/** The transfer API's codes that say "this request", not "this transfer": see above. */
const TRANSIENT_CODES = new Set(['CHUNK_INCOMPLETE', 'CLIENT_DISCONNECTED', 'TRANSFER_BUSY']);

/** Statuses of the 5xx class that are answers, not accidents: see above. */
const FINAL_5XX = new Set([501, 507]);

/** Whether an HTTP answer (its status, and the error code of its JSON body if any) is worth another attempt. */
export function isTransientStatus(status: number, code?: string): boolean {
  if (code !== undefined && TRANSIENT_CODES.has(code)) return true;
  if (status === 408 || status === 429) return true;
  return status >= 500 && status <= 599 && !FINAL_5XX.has(status);
}

const NETWORK_CODES = new Set([
  'ECONNRESET',
  'ECONNREFUSED',
  'ECONNABORTED',
  'EPIPE',
  'ETIMEDOUT',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'ENETDOWN',
  'EAI_AGAIN',
  'ENOTFOUND',
]);

/** undici and socket errors: refused, reset, closed early, timed out (also when wrapped as a cause). */
export function isNetworkError(err: unknown): boolean {
  for (let e = err, depth = 0; e instanceof Error && depth < 4; e = e.cause, depth++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === 'string' && (code.startsWith('UND_ERR') || NETWORK_CODES.has(code))) return true;
  }
  return false;
}

/** Whether a failure is worth another attempt: a transient answer, or the network's failure. */
export function isTransient(err: unknown): boolean {
  if (err instanceof HttpError) return isTransientStatus(err.status, err.code);
  return isNetworkError(err);
}

/**
 * Delay before attempt `attempt + 1` after `attempt` failures in a row: an
 * exponential capped at maxDelayMs, of which a random half is taken off, so
 * that many clients cut at once do not all come back at once.
 */
export function backoffDelay(policy: RetryPolicy, attempt: number, random = Math.random): number {
  const ceiling = Math.min(policy.maxDelayMs, policy.baseDelayMs * 2 ** Math.max(0, attempt - 1));
  return Math.round(ceiling / 2 + (random() * ceiling) / 2);
}

/** Waits out the backoff; a signal that aborts ends the wait early, and the promise rejects with its reason. */
export function backoff(policy: RetryPolicy, attempt: number, signal?: AbortSignal): Promise<void> {
  return sleep(backoffDelay(policy, attempt), undefined, { signal });
}

/** A short description of what went wrong, for a log line or the message of the error that ends a run. */
export function describe(err: unknown): string {
  const e = err as { code?: string; message?: string; cause?: { code?: string; message?: string } };
  const code = e?.cause?.code ?? e?.code;
  const message = e?.cause?.message ?? e?.message ?? String(err);
  return code && !message.includes(code) ? `${code}: ${message}` : message;
}

/**
 * Runs `attempt` until it succeeds or fails for good: a failure that is not
 * transient at once; transient ones once `retries` of them came in a row, or
 * `maxElapsedMs` passed, without progress. An attempt that gets somewhere
 * calls `progressed()`, and the count and the clock start again. `signal`
 * ends a wait early and stops the loop with its reason.
 */
export async function withRetry<T>(
  policy: RetryPolicy & {
    /** Called before each wait, for a log line. */
    onRetry?: (err: unknown, attempt: number, delayMs: number) => void;
    signal?: AbortSignal;
  },
  attempt: (n: number, progressed: () => void) => Promise<T>,
): Promise<T> {
  const { signal } = policy;
  let failures = 0;
  let since = Date.now();
  const progressed = () => {
    failures = 0;
    since = Date.now();
  };
  for (;;) {
    signal?.throwIfAborted();
    try {
      return await attempt(failures + 1, progressed);
    } catch (err) {
      if (signal?.aborted) throw signal.reason;
      failures++;
      if (!isTransient(err)) throw err;
      if (failures > policy.retries || Date.now() - since > policy.maxElapsedMs) {
        if (failures === 1 || err instanceof HttpError) throw err;
        const seconds = Math.round((Date.now() - since) / 1000);
        throw new Error(`${(err as Error).message} (gave up after ${failures} attempts in ${seconds} s)`, {
          cause: err,
        });
      }
      const delay = backoffDelay(policy, failures);
      policy.onRetry?.(err, failures, delay);
      await sleep(delay, undefined, { signal }).catch(() => {});
    }
  }
}
