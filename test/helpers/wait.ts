/** Waiting in tests: for a condition, with a deadline, never for a fixed time. */
import { setTimeout as sleep } from 'node:timers/promises';

/**
 * Polls `probe` every `intervalMs` until it returns something truthy, and
 * returns that. Past `timeoutMs` it fails, saying what it waited for and the
 * last value seen (a loaded machine is slow; a condition that never comes is
 * a bug, and the message says which).
 */
export async function waitFor<T>(
  what: string,
  probe: () => T | Promise<T>,
  opts: { timeoutMs?: number; intervalMs?: number } = {},
): Promise<NonNullable<T>> {
  const deadline = Date.now() + (opts.timeoutMs ?? 30_000);
  for (;;) {
    const value = await probe();
    if (value) return value as NonNullable<T>;
    if (Date.now() > deadline) {
      throw new Error(
        `timed out after ${opts.timeoutMs ?? 30_000} ms waiting for ${what} (last: ${String(value)})`,
      );
    }
    await sleep(opts.intervalMs ?? 20);
  }
}
