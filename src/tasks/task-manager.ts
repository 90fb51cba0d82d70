/**
 * Live tasks: progress counters, cancellation and waiters, over the store.
 *
 * Progress changes far more often than is worth writing to disk, so counters
 * live in memory and are persisted at most once per PERSIST_INTERVAL_MS and at
 * every state change. Readers always see the live values.
 */
import { randomUUID } from 'node:crypto';
import { EventEmitter } from 'node:events';
import type { Logger } from 'pino';
import { ApiError, CancelledError, NotFoundError, toApiError } from '../errors.js';
import { spaceError } from '../image/space.js';
import { nowIso } from '../storage/db.js';
import type { Page, PageRequest } from '../storage/paging.js';
import { FINISHED_STATUSES, type Task, type TaskFilter, type TaskStore } from './task-store.js';

const PERSIST_INTERVAL_MS = 1000;
/** Not a string, so it cannot collide with the task ids the same emitter uses. */
const FINISHED_EVENT = Symbol('finished');
/** How often finished tasks past their retention are removed. */
const PRUNE_INTERVAL_MS = 60_000;

/** How long, and how many, finished tasks are kept. */
export interface TaskRetention {
  maxAgeSeconds: number;
  maxCount: number;
}

/** The handle an operation holds while it runs: report bytes, watch for cancel, finish. */
export class RunningTask {
  private readonly abort = new AbortController();
  private lastPersist = 0;
  /** Bytes done before this process took the task on (a transfer resumed after a restart). */
  readonly bytesBefore: number;
  /** Of the progress made here, what moved no byte over the wire (see markCovered). */
  private covered = 0;

  constructor(
    readonly record: Task,
    private readonly manager: TaskManager,
    /** The wire format a transfer moves, for the metrics' labels (not persisted). */
    readonly format?: string,
  ) {
    this.bytesBefore = record.bytes_done;
  }

  get id(): string {
    return this.record.id;
  }

  get signal(): AbortSignal {
    return this.abort.signal;
  }

  /** Throws CancelledError if the task was cancelled. */
  throwIfCancelled(): void {
    if (this.abort.signal.aborted) throw this.abort.signal.reason;
  }

  setTotal(bytes: number | null): void {
    this.record.bytes_total = bytes;
    this.updateProgress();
  }

  addBytes(n: number): void {
    this.record.bytes_done += n;
    this.updateProgress();
    const now = Date.now();
    if (now - this.lastPersist >= PERSIST_INTERVAL_MS) {
      this.lastPersist = now;
      try {
        this.manager.persistProgress(this.record);
      } catch (err) {
        // Progress is advisory: the next update or the task's end writes it. Bytes are
        // counted from timers and stream callbacks, where a throw for a database that is
        // away (PostgreSQL restarting) would take the process down.
        if (!(err instanceof ApiError && err.code === 'METADATA_UNAVAILABLE')) throw err;
      }
    }
  }

  /**
   * Says that `n` bytes of the progress made (or about to be made) moved no
   * byte over the wire: zeros declared rather than sent, ranges a receiver
   * already had. The task's progress counts them; the byte metrics do not.
   */
  markCovered(n: number): void {
    this.covered += n;
  }

  /** Progress that crossed the wire, in this process and before it (what the byte metrics count). */
  get bytesMoved(): number {
    return this.record.bytes_done - this.covered;
  }

  /** For an operation that knows how far it is rather than how much it just did. */
  setBytesDone(n: number): void {
    if (n > this.record.bytes_done) this.addBytes(n - this.record.bytes_done);
  }

  private updateProgress(): void {
    const total = this.record.bytes_total;
    this.record.progress = total ? Math.min(1, this.record.bytes_done / total) : 0;
  }

  /** What a running task shows already (a parent's child tasks); the final result replaces it. */
  setPartialResult(result: Record<string, unknown>): void {
    this.record.result = result;
    this.manager.persist(this.record);
  }

  requestCancel(reason = 'cancelled by request'): void {
    if (!this.abort.signal.aborted) this.abort.abort(new CancelledError(`the task was cancelled: ${reason}`));
  }

  succeed(result: Record<string, unknown> | null = null): Task {
    this.record.progress = 1;
    return this.finish('success', null, result);
  }

  /** Records the failure (or cancellation, for a CancelledError) and returns the final task. */
  fail(err: unknown): Task {
    if (err instanceof CancelledError || (this.abort.signal.aborted && !(err instanceof ApiError))) {
      const e = err instanceof CancelledError ? err : (this.abort.signal.reason as CancelledError);
      return this.finish('cancelled', { code: e.code, message: e.message, status: e.status }, null);
    }
    const e = toApiError(spaceError(err));
    // Whoever reads the task gets the code and a message meant for them; the cause is logged.
    if (e.status >= 500) {
      this.manager.logger?.error({ task: this.id, type: this.record.type, err: e.cause ?? e }, 'task failed');
    }
    return this.finish('failure', { code: e.code, message: e.message, status: e.status }, null);
  }

  private finish(status: Task['status'], error: Task['error'], result: Task['result']): Task {
    if (FINISHED_STATUSES.includes(this.record.status)) return this.record;
    Object.assign(this.record, { status, error, result, finished_at: nowIso() });
    this.manager.finished(this);
    return this.record;
  }
}

/** How often the ends of tasks that could not be recorded (the store away) are tried again. */
const UNSAVED_RETRY_MS = 1000;

export class TaskManager {
  private readonly live = new Map<string, RunningTask>();
  /** Finished tasks whose end the store did not take yet (PostgreSQL away): written once it is back. */
  private readonly unsaved = new Map<string, Task>();
  private unsavedTimer: NodeJS.Timeout | null = null;
  private readonly events = new EventEmitter();

  constructor(
    private readonly store: TaskStore,
    readonly logger?: Logger,
  ) {
    this.events.setMaxListeners(0);
  }

  /** Creates a task already running (operations here start as soon as they are accepted). */
  start(
    type: string,
    vdi: string | null,
    opts: { id?: string; bytesTotal?: number | null; stagingPath?: string; format?: string } = {},
  ): RunningTask {
    const now = nowIso();
    const record: Task = {
      id: opts.id ?? randomUUID(),
      type,
      status: 'running',
      progress: 0,
      bytes_done: 0,
      bytes_total: opts.bytesTotal ?? null,
      vdi,
      created_at: now,
      started_at: now,
      finished_at: null,
      error: null,
      result: null,
      node: this.store.nodeId,
    };
    this.store.insert(record, opts.stagingPath ?? null);
    const task = new RunningTask(record, this, opts.format);
    this.live.set(record.id, task);
    return task;
  }

  /** The tasks this process is running now. */
  running(): RunningTask[] {
    return [...this.live.values()];
  }

  persist(record: Task): void {
    this.store.update(record);
  }

  /** Progress of a running task: recorded, not fsynced (see TaskStore.updateProgress). */
  persistProgress(record: Task): void {
    this.store.updateProgress(record);
  }

  finished(task: RunningTask): void {
    if (!this.recordEnd(task.record)) {
      // Fenced: this node was taken for dead and another took the task over; its outcome is that node's.
      this.logger?.warn(
        { task: task.id },
        'a task this node ran was taken over by another node; its outcome here is dropped',
      );
    }
    this.live.delete(task.id);
    this.events.emit(task.id, task.record);
    this.events.emit(FINISHED_EVENT, task);
  }

  /**
   * Writes a finished task. The store away (PostgreSQL restarting) does not
   * leave it marked running: its end is kept here, served to readers, and
   * written at the first retry the store takes. False when fenced.
   */
  private recordEnd(record: Task): boolean {
    try {
      return this.store.update(record);
    } catch (err) {
      this.logger?.error(
        { err, task: record.id },
        "could not record a task's end; it is written once the store is back",
      );
      this.unsaved.set(record.id, { ...record });
      this.unsavedTimer ??= setInterval(() => this.retryUnsaved(), UNSAVED_RETRY_MS);
      this.unsavedTimer.unref();
      return true;
    }
  }

  private retryUnsaved(): void {
    for (const [id, record] of this.unsaved) {
      try {
        this.store.update(record);
      } catch {
        return; // still away: the next round
      }
      this.unsaved.delete(id);
    }
    if (this.unsavedTimer) clearInterval(this.unsavedTimer);
    this.unsavedTimer = null;
  }

  /** Calls `listener` with every task as it finishes (any final status); returns the unsubscribe function. */
  onFinished(listener: (task: RunningTask) => void): () => void {
    this.events.on(FINISHED_EVENT, listener);
    return () => this.events.off(FINISHED_EVENT, listener);
  }

  get(id: string): Task {
    const live = this.live.get(id);
    if (live) return { ...live.record };
    const unsaved = this.unsaved.get(id);
    if (unsaved) return { ...unsaved };
    const stored = this.store.get(id);
    if (!stored) throw new NotFoundError('task', id);
    return stored;
  }

  list(filter: { status?: string; vdi?: string }): Task[] {
    return this.store.list(filter).map((t) => (this.live.has(t.id) ? { ...this.live.get(t.id)!.record } : t));
  }

  /** One page of tasks, newest first; running ones as they are now. */
  listPage(filter: TaskFilter, page: PageRequest): Page<Task> {
    const stored = this.store.listPage(filter, page);
    return {
      ...stored,
      items: stored.items.map((t) => (this.live.has(t.id) ? { ...this.live.get(t.id)!.record } : t)),
    };
  }

  /**
   * Keeps finished tasks for `retention` (their outcome is what a client
   * polls for) and then removes them, now and every PRUNE_INTERVAL_MS, so
   * the store grows with what runs, not with the service's age. Returns the
   * stop function.
   */
  startPruning(
    retention: TaskRetention,
    onPruned?: (n: number) => void,
    onError?: (err: unknown) => void,
  ): () => void {
    const prune = () => {
      const cutoff = new Date(Date.now() - retention.maxAgeSeconds * 1000).toISOString();
      try {
        const n = this.store.prune(cutoff, retention.maxCount);
        if (n > 0) onPruned?.(n);
      } catch (err) {
        // A delete writes too (SQLite's journal): on a full disk it waits for the next round.
        if (!onError) throw err;
        onError(err);
      }
    };
    prune();
    const timer = setInterval(prune, PRUNE_INTERVAL_MS);
    timer.unref();
    return () => clearInterval(timer);
  }

  /** Resolves with the task once finished, or as it is after `seconds`. */
  async wait(id: string, seconds: number): Promise<Task> {
    const task = this.get(id);
    if (FINISHED_STATUSES.includes(task.status) || seconds <= 0) return task;
    return new Promise((resolve) => {
      const onDone = (t: Task) => {
        clearTimeout(timer);
        resolve({ ...t });
      };
      const timer = setTimeout(() => {
        this.events.off(id, onDone);
        resolve(this.get(id));
      }, seconds * 1000);
      this.events.once(id, onDone);
    });
  }

  cancel(id: string): Task {
    const live = this.live.get(id);
    if (!live) {
      const task = this.get(id);
      throw new ApiError(
        'TASK_FINISHED',
        `task ${id} has already finished (${task.status}); nothing to cancel`,
      );
    }
    live.requestCancel();
    return { ...live.record };
  }

  /** Cancels everything still running (shutdown). */
  cancelAll(reason: string): void {
    for (const t of this.live.values()) t.requestCancel(reason);
  }

  /**
   * Startup: tasks a previous process left running are failed, except those in
   * `keep` (owned by a resumable transfer, which adopts them); returns the
   * staging files of the failed ones.
   */
  recover(keep: ReadonlySet<string> = new Set()): string[] {
    return this.store.failInterrupted(nowIso(), keep);
  }

  /**
   * A dead node's tasks just taken (claim): those not in `keep` died with it
   * and fail as INTERRUPTED. Returns the staging files they held.
   */
  recoverTaken(taken: ReadonlySet<string>, keep: ReadonlySet<string>): string[] {
    return this.store.failInterrupted(nowIso(), keep, taken);
  }

  /** The id of the node that runs this manager's tasks (null: a store without nodes). */
  get nodeId(): string | null {
    return this.store.nodeId;
  }

  /** Whether this node runs the task (its own, or one it took over from a dead node). */
  owns(id: string): boolean {
    return this.live.has(id) || this.store.nodeOf(id) === this.store.nodeId;
  }

  /** The ids `claim(dead)` would take, without taking them. */
  claimable(dead: ReadonlySet<string>): Set<string> {
    return new Set(this.store.claimable(dead).keys());
  }

  /** Takes over the unfinished tasks of dead nodes (see TaskStore.claim); returns their ids. */
  claim(dead: ReadonlySet<string>): string[] {
    return this.store.claim(dead);
  }

  /** Takes a running task of a previous process back under live control (a resumed transfer). */
  adopt(id: string, format?: string): RunningTask {
    const live = this.live.get(id);
    if (live) return live;
    const record = this.get(id);
    const task = new RunningTask(record, this, format);
    this.live.set(id, task);
    return task;
  }
}
