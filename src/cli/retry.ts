/**
 * Retrying with backoff: exponential delays with full jitter, capped, giving
 * up after `retries` consecutive failures or `maxElapsedMs` without progress.
 * Only transient failures are retried (network errors, 5xx but 507, 408,
 * 429); a 4xx from the server is an answer, not an accident.
 */
import { HttpError } from './http.js';

export interface RetryPolicy {
  /** Consecutive failed attempts allowed before giving up. */
  retries: number;
  /** First delay; doubles each attempt. */
  baseDelayMs: number;
  /** Largest delay between two attempts. */
  maxDelayMs: number;
  /** Give up when this long has passed without a successful attempt. */
  maxElapsedMs: number;
  /** Called before each wait, for a log line. */
  onRetry?: (err: unknown, attempt: number, delayMs: number) => void;
  /** Ends a wait early (Ctrl-C), so the next attempt can see it and stop. */
  signal?: AbortSignal;
}

export const DEFAULT_RETRY: RetryPolicy = {
  retries: 10,
  baseDelayMs: 500,
  maxDelayMs: 30_000,
  maxElapsedMs: 10 * 60_000,
};

/** Whether a failure is worth another attempt. */
export function isTransient(err: unknown): boolean {
  if (err instanceof HttpError) {
    return err.status === 408 || err.status === 429 || (err.status >= 500 && err.status !== 507);
  }
  return isNetworkError(err);
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

/** Delay before attempt `attempt` (1-based): full jitter over an exponential, capped. */
export function backoffDelay(policy: RetryPolicy, attempt: number, random = Math.random): number {
  const ceiling = Math.min(policy.maxDelayMs, policy.baseDelayMs * 2 ** (attempt - 1));
  return Math.round(ceiling / 2 + (random() * ceiling) / 2);
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    if (signal?.aborted) done();
    else signal?.addEventListener('abort', done, { once: true });
  });
}

/**
 * Runs `attempt` until it succeeds. Each call gets the attempt number; a
 * caller that makes progress inside an attempt can call `progressed()` so
 * the failure count and the clock start again.
 */
export async function withRetry<T>(
  policy: RetryPolicy,
  attempt: (n: number, progressed: () => void) => Promise<T>,
): Promise<T> {
  let failures = 0;
  let since = Date.now();
  const progressed = () => {
    failures = 0;
    since = Date.now();
  };
  for (;;) {
    try {
      return await attempt(failures + 1, progressed);
    } catch (err) {
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
      await sleep(delay, policy.signal);
    }
  }
}

/**
 * The policy with each retry said on the progress bar (or stderr, before
 * there is one) and counted, for the summary.
 */
export function announcedRetries(
  policy: RetryPolicy,
  progress: () => { log(line: string): void } | undefined,
): { policy: RetryPolicy; count: () => number } {
  let count = 0;
  return {
    count: () => count,
    policy: {
      ...policy,
      onRetry: (err, attempt, delay) => {
        count++;
        const line = `diskport: ${(err as Error).message || err}; retry ${attempt}/${policy.retries} in ${(delay / 1000).toFixed(1)} s`;
        const bar = progress();
        if (bar) bar.log(line);
        else process.stderr.write(`${line}\n`);
      },
    },
  };
}
