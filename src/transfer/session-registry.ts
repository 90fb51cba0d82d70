/**
 * The sessions: their persisted records (TransferStore) and, for the active
 * ones, what lives in memory beside the record (`Live`). A session is active
 * exactly while it is registered here; reads prefer the live record, which
 * may be ahead of the stored one between saves.
 */
import type { promises as fsp } from 'node:fs';
import { ApiError, NotFoundError } from '../errors.js';
import type { SpaceGuard } from '../image/space.js';
import { equalsSecret } from '../secrets.js';
import type { Db } from '../storage/db.js';
import type { Page, PageRequest } from '../storage/paging.js';
import type { StreamedDigests } from '../storage/streamed-digests.js';
import type { RunningTask } from '../tasks/task-manager.js';
import type { Task } from '../tasks/task-store.js';
import { RangeSet } from './range-set.js';
import { tokenMatches } from './session-record.js';
import type { StreamingImport } from './streaming-import.js';
import { type Direction, type Transfer, TransferStore } from './transfer-store.js';

/**
 * Ends one write in progress, with a reason. Not an AbortController for
 * each: a small chunk's (small-chunk.ts WriteEnd) ends its body's wait
 * directly; an AbortController per chunk, an EventTarget with its
 * listeners, cost more than the chunk's own checks.
 */
export interface WriteEnder {
  end(reason: unknown): void;
}

/** What lives in memory while a session is active. */
export interface Live {
  t: Transfer;
  /** What is durable and recorded: all that a client is told was received. */
  ranges: RangeSet;
  /**
   * Written with `flush=n`, not yet durable: becomes `ranges` at the next
   * flush point (flush.ts). Lost, as it may be, with the process.
   */
  unflushed: RangeSet;
  /** The ranges the running flush took from `unflushed`: unflushed still, until recorded. */
  flushingBatch: RangeSet | null;
  /** The flush running, and the one queued behind it (group commit). */
  flushing: Promise<void> | null;
  nextFlush: Promise<void> | null;
  /** The timer of the group commit that makes `unflushed` durable without a client asking. */
  flushTimer: NodeJS.Timeout | null;
  task: RunningTask;
  /**
   * The token a request presented whose hash was the session's: later ones
   * are compared with it (constant time) instead of each being hashed. In
   * memory only, while the session is active (the database keeps the hash).
   */
  verifiedToken: Buffer | null;
  release: () => void;
  handle: Promise<fsp.FileHandle> | null;
  /** `handle` once it has opened (null whenever `handle` is): small chunks take it without an await. */
  openHandle: fsp.FileHandle | null;
  /** The free-space guard of the staging file's directory, once looked up (image/space.ts). */
  space?: SpaceGuard | null;
  writers: number;
  finalizing: Promise<Task> | null;
  /** Why the session ended badly, with its HTTP status, for the one-shot import's answer. */
  failure: ApiError | null;
  /** Called when the last write in progress ends. */
  idleWaiters: (() => void)[];
  /**
   * One per write in progress: ends it when its bytes are no longer needed
   * (see endRedundantWrites), or when the session's task is cancelled (one
   * listener on the task's signal for the session, not one per write).
   */
  writeAborts: Set<WriteEnder>;
  /** A vhd/qcow2 upload into a raw VDI converts as it arrives (opened at the first write). */
  streaming: Promise<StreamingImport | null> | null;
  /** A differencing image is laid onto the VDI as it is (the xapi alias; not kept: a one-shot never resumes). */
  layDifferencing?: boolean;
  /** A one-shot raw import's block digests, hashed as its bytes arrive (null when unknown). */
  rawDigests?: StreamedDigests | null;
}

export class SessionRegistry {
  readonly store: TransferStore;
  private readonly live = new Map<string, Live>();

  constructor(readonly db: Db) {
    this.store = new TransferStore(db);
  }

  /** Registers an active session; it stays active until `remove`. */
  add(t: Transfer, task: RunningTask, release: () => void): Live {
    const live: Live = {
      t,
      ranges: new RangeSet(t.received),
      unflushed: new RangeSet(),
      flushingBatch: null,
      flushing: null,
      nextFlush: null,
      flushTimer: null,
      task,
      verifiedToken: null,
      release,
      handle: null,
      openHandle: null,
      writers: 0,
      finalizing: null,
      failure: null,
      idleWaiters: [],
      writeAborts: new Set(),
      streaming: null,
    };
    const signal = task.signal;
    signal.addEventListener(
      'abort',
      () => {
        for (const w of live.writeAborts) w.end(signal.reason);
      },
      { once: true },
    );
    this.live.set(t.id, live);
    return live;
  }

  remove(live: Live): void {
    if (live.flushTimer) clearTimeout(live.flushTimer);
    live.flushTimer = null;
    this.live.delete(live.t.id);
  }

  /** The active session of this id, if there is one. */
  find(id: string): Live | undefined {
    return this.live.get(id);
  }

  /** True while `live` is still the active session of its id (it did not end meanwhile). */
  isCurrent(live: Live): boolean {
    return this.live.get(live.t.id) === live;
  }

  all(): Live[] {
    return [...this.live.values()];
  }

  /** The session, if the id names one (any state). */
  get(id: string): Transfer {
    const t = this.live.get(id)?.t ?? this.store.get(id);
    if (!t) throw new NotFoundError('transfer', id);
    return t;
  }

  list(filter: { vdi?: string; active?: boolean }): Transfer[] {
    return this.store.list(filter).map((t) => this.live.get(t.id)?.t ?? t);
  }

  listPage(filter: { vdi?: string; active?: boolean }, page: PageRequest): Page<Transfer> {
    const stored = this.store.listPage(filter, page);
    return { ...stored, items: stored.items.map((t) => this.live.get(t.id)?.t ?? t) };
  }

  /**
   * True when `token` is this transfer's own. An active session hashes the
   * first token that matches and keeps it; each later request (a chunk PUT,
   * by the thousand) is one constant-time compare with it, no hash.
   */
  tokenMatches(t: Transfer, token: string): boolean {
    const live = this.live.get(t.id);
    if (!live) return tokenMatches(t, token);
    if (live.verifiedToken) return equalsSecret(token, live.verifiedToken);
    if (!tokenMatches(live.t, token)) return false;
    live.verifiedToken = Buffer.from(token);
    return true;
  }

  /** What the session has received: live while it is active, as stored once it ended. */
  rangesOf(t: Transfer): RangeSet {
    return this.live.get(t.id)?.ranges ?? new RangeSet(t.received);
  }

  /** The active session of this id, or 409 TRANSFER_NOT_ACTIVE / WRONG_DIRECTION. */
  active(id: string, direction?: Direction): Live {
    const live = this.live.get(id);
    if (!live) {
      const t = this.get(id);
      throw new ApiError('TRANSFER_NOT_ACTIVE', `transfer ${id} is ${t.state}; open a new one`, {
        state: t.state,
      });
    }
    if (direction && live.t.direction !== direction) {
      throw new ApiError(
        'WRONG_DIRECTION',
        `transfer ${id} is a${live.t.direction === 'upload' ? 'n upload' : ' download'}; it does not take ${direction === 'upload' ? 'writes' : 'reads'}`,
      );
    }
    return live;
  }
}
