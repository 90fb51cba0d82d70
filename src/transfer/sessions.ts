/**
 * Resumable transfer sessions: the unit of authority (a token for one VDI,
 * one direction, one format, until it expires) and of resumption.
 *
 * TransferService is the one door the routes, tus and pull/push use; it
 * routes each call to the module whose job it is: the sessions and their
 * records (session-registry.ts, session-record.ts), their life from open to
 * end (session-lifecycle.ts), the bytes of an active upload
 * (active-upload.ts) and the commit (finalize.ts).
 */
import type { Readable } from 'node:stream';
import type { Logger } from 'pino';
import { ApiError, toApiError } from '../errors.js';
import { spaceError } from '../image/space.js';
import type { Db } from '../storage/db.js';
import type { Page, PageRequest } from '../storage/paging.js';
import type { Snapshots } from '../storage/snapshots.js';
import type { VdiStore } from '../storage/vdis.js';
import type { RunningTask, TaskManager } from '../tasks/task-manager.js';
import type { Task } from '../tasks/task-store.js';
import { ActiveUploads, type ChunkRange, type ChunkWrite } from './active-upload.js';
import { Finalizer } from './finalize.js';
import type { ByteRange } from './range-set.js';
import { type CreateTransfer, SessionLifecycle, type SessionOptions } from './session-lifecycle.js';
import { isExpired, type TransferJson, toJson } from './session-record.js';
import { type Live, SessionRegistry } from './session-registry.js';
import type { Direction, Transfer } from './transfer-store.js';

export type { ChunkRange, ChunkWrite } from './active-upload.js';
export {
  type CreateTransfer,
  DEFAULT_TTL_SECONDS,
  MAX_TTL_SECONDS,
  type SessionOptions,
} from './session-lifecycle.js';

export class TransferService {
  private readonly sessions: SessionRegistry;
  private readonly uploads: ActiveUploads;
  private readonly lifecycle: SessionLifecycle;
  private readonly finalizer: Finalizer;

  constructor(
    db: Db,
    vdis: VdiStore,
    private readonly tasks: TaskManager,
    logger?: Logger,
    snapshots?: Snapshots,
  ) {
    this.sessions = new SessionRegistry(db);
    this.uploads = new ActiveUploads(this.sessions, vdis, tasks);
    this.lifecycle = new SessionLifecycle(this.sessions, vdis, tasks, logger);
    this.finalizer = new Finalizer(this.sessions, vdis, tasks, this.uploads, this.lifecycle, snapshots);
  }

  /** Sessions a previous process left active: their tasks and staging files must survive recovery. */
  activeAtStartup(owns?: (taskId: string) => boolean): { tasks: Set<string>; staging: Set<string> } {
    return this.lifecycle.activeAtStartup(owns);
  }

  /** Startup: takes active sessions back; a finalize that was running is run again from the staged bytes. */
  resume(owns?: (taskId: string) => boolean): void {
    this.lifecycle.resume((live) => {
      live.finalizing = this.finalizer.run(live);
    }, owns);
  }

  /** A dead node's sessions just taken over (their tasks claimed): resumed here. */
  takeOver(taken: (taskId: string) => boolean): void {
    this.lifecycle.adopt((live) => {
      live.finalizing = this.finalizer.run(live);
    }, taken);
  }

  stop(): void {
    this.lifecycle.stop();
  }

  /** Opens a session; the token is returned once, never stored. */
  create(req: CreateTransfer, opts?: SessionOptions): Promise<{ transfer: Transfer; token: string }> {
    return this.lifecycle.create(req, opts);
  }

  /** The session, if the id names one (any state). */
  get(id: string): Transfer {
    return this.sessions.get(id);
  }

  /** The session if it is active, from memory only (no database read): undefined otherwise. */
  activeSession(id: string): Transfer | undefined {
    return this.sessions.find(id)?.t;
  }

  list(filter: { vdi?: string; active?: boolean }): Transfer[] {
    return this.sessions.list(filter);
  }

  listPage(filter: { vdi?: string; active?: boolean }, page: PageRequest): Page<Transfer> {
    return this.sessions.listPage(filter, page);
  }

  /** True when `token` is this transfer's own. */
  tokenMatches(t: Transfer, token: string): boolean {
    return this.sessions.tokenMatches(t, token);
  }

  isExpired(t: Transfer): boolean {
    return isExpired(t);
  }

  toJson(t: Transfer, secret?: { token: string; baseUrl: string }): TransferJson {
    return toJson(
      t,
      this.sessions.rangesOf(t),
      () => this.tasks.get(t.task_id).error,
      secret,
      this.uploads.unflushedBytes(t.id),
    );
  }

  private active(id: string, direction?: Direction): Live {
    return this.sessions.active(id, direction);
  }

  /**
   * Lands one chunk (or the whole stream) of an upload; returns the session
   * after it. A full SR is a 507; the session keeps what landed, for its
   * client to resume once there is room (or to cancel, which frees it).
   */
  async write(id: string, body: Readable, chunk: ChunkWrite = {}): Promise<Transfer> {
    try {
      return await this.uploads.write(id, body, chunk);
    } catch (err) {
      throw spaceError(err, 'the upload');
    }
  }

  /**
   * Makes [start, end] of an upload zeros without their bytes crossing the
   * wire; `flush: false` defers durability; `overwrite` zeros bytes received already too.
   */
  zero(id: string, range: ChunkRange, flush = true, overwrite = false): Promise<Transfer> {
    return this.uploads.zero(id, range, flush, overwrite);
  }

  /** A flush point: bytes written with `flush=n` become durable, then count as received. */
  flush(id: string): Promise<Transfer> {
    return this.uploads.flush(id);
  }

  /** Every range an upload has written, flushed or not. */
  writtenRanges(id: string): ByteRange[] {
    return this.uploads.writtenRanges(id);
  }

  /** Every active session's flush point (a graceful shutdown). */
  flushAll(): Promise<void> {
    return this.uploads.flushAll();
  }

  /** Forgets every byte an upload received (its source changed). */
  reset(id: string, size: number | null = null): Promise<Transfer> {
    return this.uploads.reset(id, size);
  }

  /** Fixes the length of an upload without sending bytes (`Content-Range: bytes *\/total`). */
  declareTotal(id: string, total: number): Promise<Transfer> {
    return this.uploads.declareTotal(id, total);
  }

  /** Offset and length for HEAD. */
  uploadState(id: string): { offset: number; length: number | null } {
    return this.uploads.uploadState(id);
  }

  /** Offset and length once the writes in progress have ended (at most `maxWaitMs`). */
  settledUploadState(id: string, maxWaitMs?: number): Promise<{ offset: number; length: number | null }> {
    return this.uploads.settledUploadState(id, maxWaitMs);
  }

  /**
   * Before a finalize: makes every byte written durable (finalize is a flush
   * point), and ends writes whose bytes have all arrived another way.
   */
  async beforeFinalize(id: string, maxWaitMs?: number): Promise<void> {
    const live = this.sessions.find(id);
    if (live?.t.direction !== 'upload' || live.t.state !== 'open') return;
    await this.uploads.flush(id);
    await this.uploads.endRedundantWrites(id, maxWaitMs);
    // The writes just ended may have left bytes unflushed.
    await this.uploads.flush(id);
  }

  /** Starts the commit of a complete upload; resolves with the task once started (see `completion`). */
  finalize(id: string): Task {
    return this.finalizer.finalize(id);
  }

  /** Resolves when the session's finalize ends (success or failure). */
  completion(id: string): Promise<Task> {
    return this.finalizer.completion(id);
  }

  /** Cancels an active session: the VDI stays as it was (a download session ends as done). */
  cancel(id: string): Promise<Transfer> {
    return this.lifecycle.cancel(id);
  }

  /** Ends an active session as expired (a deadline of its holder's, not its own ttl): the VDI stays as it was. */
  async expire(id: string, message: string): Promise<void> {
    const live = this.sessions.find(id);
    if (live?.t.state !== 'open') return;
    await this.lifecycle.end(live, 'expired', new ApiError('TRANSFER_EXPIRED', message));
  }

  /** Counts bytes a download session served. */
  countServed(id: string, n: number): void {
    this.lifecycle.countServed(id, n);
  }

  /** A read for a download session failed: an image damaged at rest ends the session and fails its task. */
  failDownload(id: string, err: unknown): Promise<void> {
    return this.lifecycle.failDownload(id, err);
  }

  /** Sliding expiry for downloads too: each request renews the session. */
  renew(id: string): void {
    this.lifecycle.renew(id);
  }

  /** Renews the session for a request on it, saving the new expiry at most once a second. */
  keepAlive(id: string): void {
    this.lifecycle.keepAlive(id);
  }

  reapExpired(): Promise<void> {
    return this.lifecycle.reapExpired();
  }

  /** An upload session used for one request and committed at its end: the one-shot PUT. */
  async importWhole(req: {
    vdi: string;
    format: string;
    body: Readable;
    contentLength?: number;
    beforeBody?: () => void;
    /** A delta: the snapshot it was made against, or `current` (delta-import.ts). */
    base?: string;
    /** A differencing image, if that is what comes, is laid onto the VDI as it is (xapi's import_raw_vdi). */
    layDifferencing?: boolean;
  }): Promise<Task> {
    const { transfer } = await this.create(
      { vdi: req.vdi, direction: 'upload', format: req.format, size: req.contentLength, base: req.base },
      { origin: 'one-shot' },
    );
    const live = this.sessions.find(transfer.id)!;
    live.layDifferencing = req.layDifferencing;
    try {
      await this.write(transfer.id, req.body, { fresh: true, beforeBody: req.beforeBody });
      this.finalize(transfer.id);
    } catch (err) {
      await this.lifecycle.end(live, 'failed', err);
      throw live.failure ?? toApiError(err);
    }
    const task = await this.completion(transfer.id);
    if (task.status !== 'success') {
      // Every end of a session records its cause: one without is diskport's own defect.
      throw (
        live.failure ?? toApiError(new Error(`import task ${task.id} ended ${task.status} with no cause`))
      );
    }
    return task;
  }

  /** Keeps a pull's source validator on its session, for If-Range when it resumes after a restart. */
  keepSourceValidator(id: string, validator: string): void {
    const live = this.active(id, 'upload');
    live.t.source_validator = validator;
    this.sessions.store.save(live.t);
  }

  /** Runs work done on an active session's behalf in the background (pull, push), bound to its task. */
  runJob(id: string, job: (task: RunningTask) => Promise<Record<string, unknown> | undefined>): void {
    this.lifecycle.runJob(id, job);
  }

  /** Are there active sessions on this VDI? (VDI deletion must wait.) */
  activeOn(vdiId: string): Transfer[] {
    return this.sessions
      .all()
      .filter((l) => l.t.vdi_id === vdiId)
      .map((l) => l.t);
  }
}
