/** Retry policy shared by pull and push: exponential backoff, bounded attempts without progress. */
import { setTimeout as sleep } from 'node:timers/promises';

/** Consecutive failed attempts (none of them moved a byte) before giving up. */
export const RETRY_LIMIT = 5;
const BACKOFF_BASE_MS = 250;
const BACKOFF_MAX_MS = 8000;

/** Waits before attempt `failures + 1`: 250 ms, 500 ms, 1 s, ... capped; rejects if `signal` aborts. */
export function backoff(failures: number, signal: AbortSignal): Promise<void> {
  const ms = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** Math.max(0, failures - 1));
  return sleep(ms, undefined, { signal });
}

/** A short description of what went wrong, for the message of the error that ends a task. */
export function describe(err: unknown): string {
  const e = err as { code?: string; message?: string; cause?: { code?: string; message?: string } };
  const code = e?.cause?.code ?? e?.code;
  const message = e?.cause?.message ?? e?.message ?? String(err);
  return code && !message.includes(code) ? `${code}: ${message}` : message;
}
