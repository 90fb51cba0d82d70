/**
 * What every CLI run shares: the retry policy with each retry said on stderr
 * and counted, and Ctrl-C/SIGTERM turned into an abort that the run's
 * requests and waits obey, so it stops at once and keeps what it did.
 */
import type { RetryPolicy } from '../transfer/retry-policy.js';

/** The run was stopped by Ctrl-C or SIGTERM (exit status 130). */
export class Interrupted extends Error {
  constructor() {
    super('interrupted');
  }
}

export type AnnouncedPolicy = RetryPolicy & {
  onRetry: (err: unknown, attempt: number, delayMs: number) => void;
  signal: AbortSignal;
};

/**
 * Aborts with Interrupted on the first SIGINT or SIGTERM until `dispose()`;
 * a second one ends the process at once, for a run that takes too long to stop.
 */
export function interruptible(): { signal: AbortSignal; dispose(): void } {
  const abort = new AbortController();
  const onSignal = () => {
    if (abort.signal.aborted) process.exit(130);
    abort.abort(new Interrupted());
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  return {
    signal: abort.signal,
    dispose() {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
    },
  };
}

/**
 * The policy with each retry said on the progress bar (or stderr, before
 * there is one) and counted, for the summary; its waits end on `signal`.
 */
export function announcedRetries(
  policy: RetryPolicy,
  signal: AbortSignal,
  progress: () => { log(line: string): void } | undefined,
): { policy: AnnouncedPolicy; count: () => number } {
  let count = 0;
  return {
    count: () => count,
    policy: {
      ...policy,
      signal,
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
