/**
 * A session's life: opened (the VDI locked for an upload, its staging file
 * and task created), taken back after a restart, and ended: committed,
 * cancelled, expired or failed, each leaving the VDI as the commit left it
 * or as it was. Background jobs (pull, push) are bound to it here.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import type { Logger } from 'pino';
import { ApiError, CancelledError, toApiError } from '../errors.js';
import { codecFor } from '../formats/index.js';
import { PRIVATE_FILE_MODE } from '../image/file-io.js';
import { isOutOfSpace, spaceError } from '../image/space.js';
import { dropCachedPages } from '../image/sparse.js';
import type { VdiStore } from '../storage/vdis.js';
import type { RunningTask, TaskManager } from '../tasks/task-manager.js';
import type { Task } from '../tasks/task-store.js';
import { assertBase, checkBaseRequest } from './delta-import.js';
import { hashToken, isExpired, isOneShot, streamDestOf, touch } from './session-record.js';
import type { Live, SessionRegistry } from './session-registry.js';
import type { Direction, Transfer, TransferOrigin } from './transfer-store.js';
import { checkDeclaredSize, parseChecksum, spaceNeeded } from './upload-rules.js';

export const DEFAULT_TTL_SECONDS = 3600;
export const MAX_TTL_SECONDS = 7 * 24 * 3600;
const REAP_INTERVAL_MS = 5000;
/** A session kept alive by requests saves its expiry this often at most. */
const KEEP_ALIVE_SAVE_MS = 30_000;

export interface CreateTransfer {
  vdi: string;
  direction: Direction;
  format?: string;
  size?: number;
  checksum?: string;
  ttl_seconds?: number;
  /** Pull: where diskport fetches the image from (recorded on the row). */
  source_url?: string;
  /** Push: where diskport sends the disk (recorded on the row, without its token). */
  target_url?: string;
  /** An upload of a differencing image: the snapshot it was made against, or `current` (delta-import.ts). */
  base?: string;
  /**
   * Upload: snapshot the VDI right after the commit, as part of it, and name
   * the snapshot in the session and its task's result (the base of an
   * incremental push's next delta).
   */
  snapshot_after_commit?: boolean;
}

/** What diskport itself says of a session it opens; no client sets these. */
export interface SessionOptions {
  origin?: TransferOrigin;
  /** The client's own metadata (tus). */
  metadata?: Record<string, string>;
  /** A push's receiver URL with its token (sealed when the service has a token). */
  push_target?: string;
  /** A raw upload that writes part of the disk: the rest keeps the VDI's content (Transfer.in_place). */
  in_place?: boolean;
}

export class SessionLifecycle {
  /** When each live session last saved the expiry its requests renewed. */
  private readonly keepAliveSaved = new WeakMap<Live, number>();
  private reaper: NodeJS.Timeout | null = null;

  constructor(
    private readonly sessions: SessionRegistry,
    private readonly vdis: VdiStore,
    private readonly tasks: TaskManager,
    private readonly logger?: Logger,
  ) {}

  /** Sessions a previous process left active (of the tasks `owns` says are this node's): their tasks and staging files must survive recovery. */
  activeAtStartup(owns: (taskId: string) => boolean = () => true): {
    tasks: Set<string>;
    staging: Set<string>;
  } {
    const active = this.sessions.store.list({ active: true }).filter((t) => !isOneShot(t) && owns(t.task_id));
    return {
      tasks: new Set(active.map((t) => t.task_id)),
      staging: new Set(active.flatMap((t) => (t.staging_path ? [t.staging_path, streamDestOf(t)] : []))),
    };
  }

  /**
   * Startup: takes back the active sessions whose task this node owns (its
   * own after a restart, or a dead node's it took over). A finalize that was running is
   * handed to `finishFinalize`, to be run again from the staged bytes.
   */
  resume(finishFinalize: (live: Live) => void, owns: (taskId: string) => boolean = () => true): void {
    this.adopt(finishFinalize, owns);
    // A round that fails (the metadata database away) is logged; the next one retries.
    this.reaper = setInterval(
      () => void this.reapExpired().catch((err) => this.logger?.error({ err }, 'expiring transfers failed')),
      REAP_INTERVAL_MS,
    );
    this.reaper.unref();
  }

  /** Takes the stored active sessions `owns` says are this node's (and not live yet) under live control. */
  adopt(finishFinalize: (live: Live) => void, owns: (taskId: string) => boolean): void {
    for (const t of this.sessions.store.list({ active: true })) {
      // Another live node's session: that node serves it.
      if (!owns(t.task_id) || this.sessions.find(t.id)) continue;
      try {
        if (isOneShot(t)) {
          // Nobody holds a one-shot import's session: it died with its request.
          t.state = 'failed';
          this.sessions.store.save(t);
          continue;
        }
        const live = this.attach(t, this.tasks.adopt(t.task_id, t.format));
        if (t.state === 'finalizing') {
          this.logger?.info({ transfer: t.id }, 'finishing a finalize interrupted by a restart');
          finishFinalize(live);
        }
      } catch (err) {
        this.logger?.error({ err, transfer: t.id }, 'could not resume transfer');
      }
    }
  }

  stop(): void {
    if (this.reaper) clearInterval(this.reaper);
  }

  private attach(t: Transfer, task: RunningTask): Live {
    const release =
      t.direction === 'upload' ? this.vdis.locks.acquire(t.vdi_id, `transfer ${t.id}`) : () => {};
    const live = this.sessions.add(t, task, release);
    // Cancelling the task (POST /v1/tasks/{id}/cancel) cancels the session; a
    // finalize in progress sees the same signal and unwinds by itself.
    task.signal.addEventListener(
      'abort',
      () => {
        if (live.t.state === 'open') void this.end(live, 'cancelled', task.signal.reason);
      },
      { once: true },
    );
    return live;
  }

  async create(
    req: CreateTransfer,
    opts: SessionOptions = {},
  ): Promise<{ transfer: Transfer; token: string }> {
    const vdi = this.vdis.get(req.vdi);
    if (req.direction === 'upload') this.vdis.assertWritable(vdi, 'an upload');
    const format = codecFor(req.format ?? 'raw').name;
    const ttl = req.ttl_seconds ?? DEFAULT_TTL_SECONDS;
    if (!Number.isInteger(ttl) || ttl < 1 || ttl > MAX_TTL_SECONDS) {
      throw new ApiError(
        'INVALID_REQUEST',
        `ttl_seconds must be between 1 and ${MAX_TTL_SECONDS}, got ${ttl}`,
      );
    }
    if (req.checksum !== undefined) parseChecksum(req.checksum);
    if (req.base !== undefined) {
      if (req.direction !== 'upload') {
        throw new ApiError('INVALID_REQUEST', 'base describes a delta upload; a download session takes none');
      }
      checkBaseRequest(this.vdis, format, req.base, (opts.origin ?? 'api') === 'api');
      if (format === 'raw' && req.checksum !== undefined) {
        throw new ApiError(
          'INVALID_REQUEST',
          'checksum is of a whole stream, and raw chunks against a base send only what changed: ' +
            'leave checksum out, and compare GET /v1/vdis/{id}/checksum once committed',
          { format, base: req.base },
        );
      }
      // Refused before a byte is sent; checked again at the commit.
      await assertBase(this.vdis, vdi, req.base);
    }
    if (req.size !== undefined) {
      checkDeclaredSize(req.size, format, vdi);
      await this.vdis.ensureSpace(vdi, spaceNeeded(req.size, 0, format, vdi, req.checksum), 'the upload');
    }
    if (req.direction === 'download' && (req.size !== undefined || req.checksum !== undefined)) {
      throw new ApiError(
        'INVALID_REQUEST',
        'size and checksum describe an upload; a download session takes neither',
      );
    }
    if (req.direction === 'download' && req.snapshot_after_commit) {
      throw new ApiError(
        'INVALID_REQUEST',
        'snapshot_after_commit snapshots the VDI an upload commits; a download session commits nothing',
      );
    }

    const id = randomUUID();
    const token = randomBytes(32).toString('base64url');
    const taskId = randomUUID();
    const upload = req.direction === 'upload';
    const staging = upload ? this.vdis.stagingPath(vdi, `transfer-${id}.${format}`) : null;
    // Raw chunks against a base are a delta too: what they do not write keeps the VDI's content.
    const inPlace = (opts.in_place === true || req.base !== undefined) && upload && format === 'raw';
    const now = Date.now();
    const t: Transfer = {
      id,
      vdi_id: vdi.id,
      direction: req.direction,
      format,
      // An in-place upload is the disk, written where it changes: its size is the disk's.
      size: req.size ?? (inPlace ? vdi.virtual_size : null),
      checksum: req.checksum ?? null,
      token_hash: hashToken(token),
      task_id: taskId,
      staging_path: staging,
      state: 'open',
      ttl_seconds: ttl,
      expires_at: new Date(now + ttl * 1000).toISOString(),
      created_at: new Date(now).toISOString(),
      received: [],
      source_url: req.source_url ?? null,
      target_url: req.target_url ?? null,
      metadata: opts.metadata ?? null,
      origin: opts.origin ?? 'api',
      stream_epoch: 0,
      push_target: opts.push_target ?? null,
      source_validator: null,
      base: req.base ?? null,
      snapshot_after_commit: req.snapshot_after_commit === true,
      snapshot_id: null,
      in_place: inPlace,
    };
    // One writer per VDI: take the lock before anything is created.
    const release = upload ? this.vdis.locks.acquire(vdi.id, `transfer ${id}`) : () => {};
    // The content is about to be replaced: its cached pages only crowd the new ones out.
    // Not by a delta, which is laid over it and may read it at the commit.
    if (upload && req.base === undefined) await dropCachedPages(this.vdis.imagePath(vdi));
    try {
      if (staging) {
        const h = await fsp.open(staging, 'w', PRIVATE_FILE_MODE);
        // A raw stream is the disk itself: its unsent parts are holes of the right size.
        await h.truncate(format === 'raw' ? vdi.virtual_size : (t.size ?? 0));
        await h.close();
      }
      const task = this.tasks.start(upload ? 'import' : 'export', vdi.id, {
        id: taskId,
        format: t.format,
        bytesTotal: t.size,
        stagingPath: staging ?? undefined,
      });
      this.sessions.store.insert(t);
      release();
      this.attach(t, task);
    } catch (err) {
      release();
      if (staging) await fsp.rm(staging, { force: true });
      throw err;
    }
    return { transfer: t, token };
  }

  /** Cancels an active session: the VDI stays as it was. */
  async cancel(id: string): Promise<Transfer> {
    const live = this.sessions.active(id);
    if (live.t.state === 'finalizing') {
      throw new ApiError(
        'TRANSFER_FINALIZING',
        `transfer ${id} is being committed; it can no longer be cancelled`,
      );
    }
    if (live.t.direction === 'download') {
      // A download session ends when its holder is done with it.
      await this.completeDownload(live);
      return live.t;
    }
    await this.end(
      live,
      'cancelled',
      new CancelledError('the transfer was cancelled by its holder; the VDI is unchanged'),
    );
    return live.t;
  }

  /** Ends a download session as done: its task succeeds with the bytes it served. */
  async completeDownload(live: Live, result: Record<string, unknown> = {}): Promise<void> {
    live.t.state = 'committed';
    this.sessions.store.save(live.t);
    const cleaned = this.cleanup(live);
    live.task.succeed({
      vdi: live.t.vdi_id,
      format: live.t.format,
      bytes_sent: live.task.record.bytes_done,
      ...result,
    });
    await cleaned;
  }

  /** Ends a session without a commit: state, task outcome, staging removed, lock released. */
  async end(live: Live, state: 'cancelled' | 'expired' | 'failed', reason: unknown): Promise<Task | null> {
    if (!this.sessions.isCurrent(live)) return null;
    live.failure = toApiError(spaceError(reason, 'the upload'));
    live.t.state = state;
    try {
      this.sessions.store.save(live.t);
    } catch (err) {
      if (!isOutOfSpace(err)) throw err;
      // The disk is full: free the staged bytes first, so that the record of the end fits.
      live.task.requestCancel(`the transfer is ${state}`);
      await this.cleanup(live);
      this.sessions.store.save(live.t);
    }
    // Writes still landing stop now, with a clear answer, before their file is closed.
    live.task.requestCancel(`the transfer is ${state}`);
    // Whoever sees the task fail finds its staged bytes gone and their space back.
    await this.cleanup(live);
    return live.task.fail(live.failure);
  }

  /** Lets go of everything an ended session held: the registry, the VDI's lock, its files. */
  async cleanup(live: Live): Promise<void> {
    // The VDI is free as soon as the session is over: whoever saw its task
    // finish may open the next one at once. Its staging file has its own name.
    this.sessions.remove(live);
    live.release();
    const handle = live.handle;
    live.handle = null;
    live.openHandle = null;
    await handle?.then((h) => h.close()).catch(() => {});
    const streaming = live.streaming;
    live.streaming = null;
    await streaming?.then((s) => s?.close()).catch(() => {});
    if (live.t.staging_path) {
      await fsp.rm(live.t.staging_path, { force: true });
      await fsp.rm(streamDestOf(live.t), { force: true });
    }
  }

  /**
   * A download session whose image could not be read (IMAGE_CORRUPT: damaged
   * at rest) can serve nothing more: it ends as failed, and so does its task.
   * Any other failure of a read (a client gone mid-body) leaves it open.
   */
  async failDownload(id: string, err: unknown): Promise<void> {
    const live = this.sessions.find(id);
    if (live?.t.direction !== 'download' || live.t.state !== 'open') return;
    if (toApiError(err).code !== 'IMAGE_CORRUPT') return;
    await this.end(live, 'failed', err);
  }

  /** Counts bytes a download session served. */
  countServed(id: string, n: number): void {
    const live = this.sessions.find(id);
    if (!live) return;
    live.task.addBytes(n);
    // A long download is activity: it keeps the session alive.
    this.keepAlive(id);
  }

  /**
   * Activity on a session: renews it in memory, where the reaper looks, and
   * saves the new expiry (for a restart) only every KEEP_ALIVE_SAVE_MS or
   * half its ttl: a save costs a synchronous commit, which a request each
   * would pay for (the event loop waits on the fsync).
   */
  keepAlive(id: string): void {
    const live = this.sessions.find(id);
    if (!live) return;
    touch(live.t);
    const now = Date.now();
    const every = Math.min(KEEP_ALIVE_SAVE_MS, (live.t.ttl_seconds * 1000) / 2);
    if (now - (this.keepAliveSaved.get(live) ?? 0) < every) return;
    this.keepAliveSaved.set(live, now);
    this.sessions.store.save(live.t);
  }

  /** Sliding expiry for downloads too: each request renews the session. */
  renew(id: string): void {
    const live = this.sessions.find(id);
    if (!live) return;
    touch(live.t);
    this.sessions.store.save(live.t);
  }

  async reapExpired(): Promise<void> {
    for (const live of this.sessions.all()) {
      if (live.t.state !== 'open' || live.writers > 0 || !isExpired(live.t)) continue;
      this.logger?.info({ transfer: live.t.id }, 'transfer expired');
      await this.end(
        live,
        'expired',
        new ApiError(
          'TRANSFER_EXPIRED',
          `the transfer expired after ${live.t.ttl_seconds} s without activity`,
        ),
      );
    }
  }

  /**
   * Runs work done on an active session's behalf in the background (pull,
   * push), bound to its task: cancelling the task aborts the task's signal. A
   * job that throws ends the session as failed (the VDI stays as it was); a
   * download session whose job returns ends with the job's result.
   */
  runJob(id: string, job: (task: RunningTask) => Promise<Record<string, unknown> | undefined>): void {
    const live = this.sessions.active(id);
    void job(live.task)
      .then(
        async (result) => {
          if (this.sessions.find(id) !== live || live.t.direction !== 'download') return;
          await this.completeDownload(live, result);
        },
        async (err) => {
          if (this.sessions.find(id) === live && live.t.state === 'open') await this.end(live, 'failed', err);
        },
      )
      .catch((err) => this.logger?.error({ err, transfer: id }, 'background transfer job failed'));
  }
}
