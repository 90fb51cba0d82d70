/**
 * Resumable transfer sessions: the unit of authority (a token for one VDI,
 * one direction, one format, until it expires) and of resumption.
 *
 * TransferService is the one door the routes, tus and pull/push use; it
 * routes each call to the module whose job it is: the sessions and their
 * records (session-registry.ts, session-record.ts), their life from open to
 * end (session-lifecycle.ts), the bytes of an active upload
 * (active-upload.ts), and finalize. Finalize checks that every byte arrived,
 * verifies the checksum, then validates, converts and commits in one step
 * that a crash either completes or undoes.
 */
import { promises as fsp } from 'node:fs';
import type { Readable } from 'node:stream';
import type { Logger } from 'pino';
import { ApiError, toApiError } from '../errors.js';
import { spaceError } from '../image/space.js';
import { type Db, nowIso } from '../storage/db.js';
import type { Page, PageRequest } from '../storage/paging.js';
import type { VdiStore } from '../storage/vdis.js';
import type { RunningTask, TaskManager } from '../tasks/task-manager.js';
import type { Task } from '../tasks/task-store.js';
import { ActiveUploads, type ChunkRange, type ChunkWrite } from './active-upload.js';
import { commitStaged } from './commit.js';
import { type CreateTransfer, SessionLifecycle } from './session-lifecycle.js';
import { isExpired, ONE_SHOT_KEY, type TransferJson, toJson, tokenMatches } from './session-record.js';
import { type Live, SessionRegistry } from './session-registry.js';
import type { Direction, Transfer } from './transfer-store.js';
import { verifyChecksum } from './upload-rules.js';

export type { ChunkRange, ChunkWrite } from './active-upload.js';
export { type CreateTransfer, DEFAULT_TTL_SECONDS, MAX_TTL_SECONDS } from './session-lifecycle.js';

export class TransferService {
  private readonly sessions: SessionRegistry;
  private readonly uploads: ActiveUploads;
  private readonly lifecycle: SessionLifecycle;

  constructor(
    db: Db,
    private readonly vdis: VdiStore,
    private readonly tasks: TaskManager,
    logger?: Logger,
  ) {
    this.sessions = new SessionRegistry(db);
    this.uploads = new ActiveUploads(this.sessions, vdis, tasks);
    this.lifecycle = new SessionLifecycle(this.sessions, vdis, tasks, logger);
  }

  /** Sessions a previous process left active: their tasks and staging files must survive recovery. */
  activeAtStartup(): { tasks: Set<string>; staging: Set<string> } {
    return this.lifecycle.activeAtStartup();
  }

  /** Startup: takes active sessions back; a finalize that was running is run again from the staged bytes. */
  resume(): void {
    this.lifecycle.resume((live) => {
      live.finalizing = this.runFinalize(live);
    });
  }

  stop(): void {
    this.lifecycle.stop();
  }

  /** Opens a session; the token is returned once, never stored. */
  create(req: CreateTransfer): Promise<{ transfer: Transfer; token: string }> {
    return this.lifecycle.create(req);
  }

  /** The session, if the id names one (any state). */
  get(id: string): Transfer {
    return this.sessions.get(id);
  }

  list(filter: { vdi?: string; active?: boolean }): Transfer[] {
    return this.sessions.list(filter);
  }

  listPage(filter: { vdi?: string; active?: boolean }, page: PageRequest): Page<Transfer> {
    return this.sessions.listPage(filter, page);
  }

  /** True when `token` is this transfer's own. */
  tokenMatches(t: Transfer, token: string): boolean {
    return tokenMatches(t, token);
  }

  isExpired(t: Transfer): boolean {
    return isExpired(t);
  }

  toJson(t: Transfer, secret?: { token: string; baseUrl: string }): TransferJson {
    return toJson(t, this.sessions.rangesOf(t), () => this.tasks.get(t.task_id).error, secret);
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

  /** Makes [start, end] of an upload zeros without their bytes crossing the wire. */
  zero(id: string, range: ChunkRange): Promise<Transfer> {
    return this.uploads.zero(id, range);
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

  /** Before a finalize: ends writes whose bytes have all arrived another way. */
  endRedundantWrites(id: string, maxWaitMs?: number): Promise<void> {
    return this.uploads.endRedundantWrites(id, maxWaitMs);
  }

  /** Starts the commit of a complete upload; resolves with the task once started (see `completion`). */
  finalize(id: string): Task {
    const live = this.active(id, 'upload');
    if (live.finalizing) return { ...live.task.record };
    const t = live.t;
    if (t.size === null) {
      throw new ApiError(
        'SIZE_UNKNOWN',
        'the upload length is not known yet: send a chunk with Content-Range bytes a-b/total, or declare size',
      );
    }
    if (live.writers > 0) {
      throw new ApiError(
        'TRANSFER_BUSY',
        `${live.writers} chunk upload(s) still running; finalize when they have finished`,
      );
    }
    const missing = live.ranges.missing(0, t.size);
    if (missing.length) {
      const bytes = missing.reduce((n, [s, e]) => n + e - s, 0);
      throw new ApiError(
        'TRANSFER_INCOMPLETE',
        `${bytes} of ${t.size} bytes have not arrived (first gap at ${missing[0][0]}); send them, then finalize`,
        { missing: missing.slice(0, 16), missing_bytes: bytes },
      );
    }
    t.state = 'finalizing';
    this.sessions.store.save(t);
    live.finalizing = this.runFinalize(live);
    return { ...live.task.record };
  }

  /** Resolves when the session's finalize ends (success or failure). */
  async completion(id: string): Promise<Task> {
    const live = this.sessions.find(id);
    if (live?.finalizing) return live.finalizing;
    return this.tasks.get(this.get(id).task_id);
  }

  private async runFinalize(live: Live): Promise<Task> {
    const { t, task } = live;
    try {
      await (await live.handle)?.close();
      live.handle = null;
      const staged = t.staging_path!;
      const vdi = this.vdis.get(t.vdi_id);
      if (t.format !== 'raw') await fsp.truncate(staged, t.size!);
      if (t.checksum) {
        const fileSize = t.format === 'raw' ? vdi.virtual_size : t.size!;
        await verifyChecksum(staged, fileSize, t.size!, t.checksum, task.signal);
      }
      const streaming = await this.uploads.streamingOf(live, vdi);
      const result = (generation: number) => ({
        vdi: vdi.id,
        format: t.format,
        generation,
        bytes_received: live.ranges.size(),
        ...(streaming && { bytes_streamed: streaming.streamedBytes }),
        transfer: t.id,
      });
      // The content switch, the session's state and the task's outcome commit
      // together: a crash cannot leave a committed VDI with a failed task.
      const committed = await commitStaged(
        this.vdis,
        vdi,
        staged,
        t.format,
        task,
        streaming,
        (generation) => {
          t.state = 'committed';
          this.sessions.store.save(t);
          this.tasks.persist({
            ...task.record,
            status: 'success',
            progress: 1,
            finished_at: nowIso(),
            result: result(generation),
          });
        },
      );
      const cleaned = this.lifecycle.cleanup(live);
      const done = task.succeed(result(committed.generation));
      await cleaned;
      return done;
    } catch (err) {
      const failed = await this.lifecycle.end(live, 'failed', err);
      return failed ?? task.record;
    }
  }

  /** Cancels an active session: the VDI stays as it was (a download session ends as done). */
  cancel(id: string): Promise<Transfer> {
    return this.lifecycle.cancel(id);
  }

  /** Counts bytes a download session served. */
  countServed(id: string, n: number): void {
    this.lifecycle.countServed(id, n);
  }

  /** Sliding expiry for downloads too: each request renews the session. */
  renew(id: string): void {
    this.lifecycle.renew(id);
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
  }): Promise<Task> {
    const { transfer } = await this.create({
      vdi: req.vdi,
      direction: 'upload',
      format: req.format,
      size: req.contentLength,
      metadata: { [ONE_SHOT_KEY]: 'true' },
    });
    const live = this.sessions.find(transfer.id)!;
    try {
      await this.write(transfer.id, req.body, { fresh: true, beforeBody: req.beforeBody });
      this.finalize(transfer.id);
    } catch (err) {
      await this.lifecycle.end(live, 'failed', err);
      throw live.failure ?? toApiError(err);
    }
    const task = await this.completion(transfer.id);
    if (task.status !== 'success') throw live.failure ?? new ApiError('IMPORT_FAILED', 'the import failed');
    return task;
  }

  /** Records a note on a session that must outlive a restart (e.g. a pull's source validator). */
  annotate(id: string, key: string, value: string): void {
    const live = this.active(id);
    live.t.metadata = { ...live.t.metadata, [key]: value };
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
