/**
 * Flush points of an upload session (ovirt-imageio's `flush` semantics).
 *
 * A chunk written with `flush=n` is in the staging file (the page cache, or
 * the device for O_DIRECT writes) when its request ends, but not durable:
 * its range waits in `live.unflushed`. A flush point makes every range
 * written so far durable with one fdatasync, and only then records them as
 * received (in memory and in the database, in one save). So what a client is
 * told was received, and what a restart resumes from, is always durable; a
 * kill -9 or a power cut loses at most the unflushed ranges, which the client
 * sends again.
 *
 * Flush points: a PUT or PATCH zero with flush (the default), PATCH
 * {"op": "flush"}, finalize, a graceful shutdown, and the group commit: once
 * GROUP_COMMIT_BYTES are unflushed, or GROUP_COMMIT_MS after the first
 * unflushed byte. Flushes asked for while one runs share the next one (a
 * group commit), so parallel flushing writers pay one fdatasync between them.
 */
import { RangeSet } from './range-set.js';
import type { Live, SessionRegistry } from './session-registry.js';

/** A session's unflushed bytes are flushed by themselves at most this long after they were written. */
export const GROUP_COMMIT_MS = 1000;
/** ...or as soon as this many are unflushed. */
export const GROUP_COMMIT_BYTES = 64 * 1024 * 1024;

export class Flusher {
  constructor(
    private readonly sessions: SessionRegistry,
    /** Saves the session's received ranges and its task's progress. */
    private readonly persist: (live: Live) => void,
  ) {}

  /**
   * [start, end) is written, not durable: it counts at the next flush point,
   * which the group commit brings within GROUP_COMMIT_MS.
   */
  wrote(live: Live, start: number, end: number): void {
    if (end <= start) return;
    live.unflushed.add(start, end);
    if (live.unflushed.size() >= GROUP_COMMIT_BYTES) {
      void this.flush(live).catch(() => {});
    } else if (!live.flushTimer) {
      live.flushTimer = setTimeout(() => {
        live.flushTimer = null;
        // A failed group commit drops its ranges (see run): the client finds them missing and resends.
        void this.flush(live).catch(() => {});
      }, GROUP_COMMIT_MS);
      live.flushTimer.unref();
    }
  }

  /**
   * A flush point: every range in `live.unflushed` when the flush starts is
   * made durable, then recorded. Resolves once that is done for every write
   * that completed before this call.
   */
  flush(live: Live): Promise<void> {
    // One queued behind the running flush has not taken its ranges yet: join it.
    if (live.nextFlush) return live.nextFlush;
    const start = (): Promise<void> => {
      const run = this.run(live).finally(() => {
        if (live.flushing === run) live.flushing = null;
      });
      live.flushing = run;
      return run;
    };
    if (!live.flushing) return start();
    // The running flush took its ranges before this call's writes may have landed: the next one.
    const next = live.flushing
      .catch(() => {})
      .then(() => {
        live.nextFlush = null;
        return start();
      });
    live.nextFlush = next;
    return next;
  }

  private async run(live: Live): Promise<void> {
    if (live.flushTimer) clearTimeout(live.flushTimer);
    live.flushTimer = null;
    const batch = live.unflushed;
    if (batch.size() === 0 || !this.sessions.isCurrent(live)) return;
    live.unflushed = new RangeSet();
    live.flushingBatch = batch;
    try {
      // A failure drops the batch: after a failed fdatasync nobody knows what
      // reached the disk, so none of it may be recorded. Its client resends it.
      const handle = await live.handle;
      await handle?.datasync();
      await (await live.streaming)?.sync();
      // Ended meanwhile (cancelled, expired): its ranges no longer count anywhere.
      if (!this.sessions.isCurrent(live)) return;
      for (const [s, e] of batch.toJSON()) live.ranges.add(s, e);
      this.persist(live);
    } finally {
      live.flushingBatch = null;
    }
  }
}

/** Bytes written and not yet recorded as received: waiting for a flush point, or in the one running. */
export function unflushedBytes(live: Live): number {
  return live.unflushed.size() + (live.flushingBatch?.size() ?? 0);
}
