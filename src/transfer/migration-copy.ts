/**
 * One disk's round of a set migration: ranges of a snapshot here written
 * into the disk's VDI on the destination through one write ticket, then
 * committed there (the ticket's finalize: all of it or nothing).
 *
 * Resumable: the ticket's id is chosen here and journaled before the
 * destination is asked for it, so after a restart of either side the round
 * goes on through the same ticket; the destination says which ranges it
 * holds (each write and zero is durable there once answered) and only the
 * others are sent. A ticket the destination no longer has (expired while
 * this side was down) is replaced by a new one and the round sent again.
 */
import { randomUUID } from 'node:crypto';
import { isZero } from '../image/zero.js';
import type { VdiStore } from '../storage/vdis.js';
import type { RunningTask } from '../tasks/task-manager.js';
import type { Destination } from './migration-destination.js';
import type { DiskProgress } from './migration-journal.js';
import { RangeSet } from './range-set.js';

/** Largest write in one request: what a broken connection costs at most. */
export const CHUNK_BYTES = 8 * 1024 * 1024;

export interface RoundContext {
  vdis: VdiStore;
  dest: Destination;
  parent: RunningTask;
  /** Journals the migration's progress (after every change to a disk's state). */
  save(): void;
  /** Throws when the migration or the disk's task was cancelled. */
  check(): void;
  /** The full copy's progress of this disk went up to `bytes`: the tasks show it. */
  progress(bytes: number): void;
}

/** [start, length] pairs of the snapshot to send, in order. */
export type Ranges = [number, number][];

/**
 * Sends `ranges` of `snapshot` to disk `d`'s destination VDI and commits
 * them; returns the bytes of the ranges. `counted`: the round is the full
 * copy, whose bytes are the tasks' progress.
 */
export async function sendRound(
  ctx: RoundContext,
  d: DiskProgress,
  snapshot: string,
  ranges: Ranges,
  counted: boolean,
): Promise<number> {
  const { dest, parent } = ctx;
  const signal = parent.signal;
  const migration = dest.token.id;
  const total = ranges.reduce((n, r) => n + r[1], 0);
  if (total === 0) {
    // Nothing differs: the destination holds this snapshot's content already.
    d.holds = snapshot;
    d.sending = null;
    ctx.save();
    return 0;
  }

  let have = new RangeSet([]);
  let finalized = false;
  if (d.sending?.snapshot === snapshot) {
    const ticket = d.sending.ticket;
    const held = await dest.retrying('the state of a write ticket', signal, () =>
      dest.holding(ticket, signal),
    );
    if (held?.state === 'open') have = new RangeSet(held.received);
    else if (held?.state === 'finalizing' || held?.state === 'committed') finalized = true;
    else d.sending = null;
  } else {
    d.sending = null;
  }
  if (!d.sending) {
    // Journaled before it is asked for: a restart in between finds it (or learns it was never made).
    const ticket = randomUUID();
    d.sending = { snapshot, ticket, url: `/images/${ticket}` };
    ctx.save();
    await dest.retrying('a write ticket', signal, async () => {
      const held = await dest.holding(ticket, signal);
      if (held) return;
      await dest.call(
        'POST',
        `/v1/migrations/${migration}/vdis/${d.dest_vdi}/tickets`,
        `a write ticket for ${d.vdi}`,
        { ticket },
        signal,
      );
    });
  }
  const sending = d.sending;

  const doneOf = () => ranges.reduce((n, [a, len]) => n + len - missingBytes(have, a, a + len), 0);
  if (counted) ctx.progress(finalized ? total : doneOf());

  if (!finalized) {
    const lease = await ctx.vdis.images.lease(snapshot);
    try {
      let done = doneOf();
      for (const [start, length] of ranges) {
        for (const [ma, mb] of have.missing(start, start + length)) {
          for (let off = ma; off < mb; off += CHUNK_BYTES) {
            ctx.check();
            const n = Math.min(CHUNK_BYTES, mb - off);
            const data = await lease.image.read(off, n);
            // A zero range is declared, not sent: as cheap as a hole, and durable like a write.
            await dest.retrying('a write', signal, () =>
              isZero(data)
                ? dest.zero(sending.url, off, n, signal)
                : dest.write(sending.url, off, data, signal),
            );
            done += n;
            if (counted) ctx.progress(done);
          }
        }
      }
    } finally {
      lease.release();
    }
  }
  ctx.check();
  await dest.retrying('the commit of a disk', signal, () =>
    dest.call(
      'POST',
      `/v1/migrations/${migration}/tickets/${sending.ticket}/finalize`,
      `the commit of ${d.vdi}`,
      {},
      signal,
    ),
  );
  d.holds = snapshot;
  d.sending = null;
  ctx.save();
  return total;
}

function missingBytes(have: RangeSet, a: number, b: number): number {
  return have.missing(a, b).reduce((n, [x, y]) => n + y - x, 0);
}
