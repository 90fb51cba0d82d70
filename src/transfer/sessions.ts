/**
 * Resumable transfer sessions: the unit of authority (a token for one VDI,
 * one direction, one format, until it expires) and of resumption.
 *
 * An upload session owns a staging file. Chunks land at their offsets, in any
 * order, in parallel, repeating bytes already sent; only bytes not yet
 * received are written, so a resend can never damage what arrived. Finalize
 * checks that every byte arrived, verifies the checksum, then validates,
 * converts and commits in one step that a crash either completes or undoes.
 *
 * Durability (the fsync policy): a range counts as received only after
 * fdatasync of the staging file, and is then recorded in SQLite. So the
 * Upload-Offset that HEAD reports is always on disk. A long stream sent
 * without Content-Range is checkpointed every CHECKPOINT_INTERVAL_MS the same
 * way, and a broken connection keeps the bytes that arrived. The cost is one
 * fdatasync per chunk and per second of streaming.
 */
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import type { Readable } from 'node:stream';
import type { Logger } from 'pino';
import { ApiError, CancelledError, formatBytes, toApiError } from '../errors.js';
import { codecFor } from '../formats/index.js';
import { DirectWriter } from '../image/direct-writer.js';
import { RawFileImage } from '../image/raw-file-image.js';
import { readVirtual } from '../image/read-virtual.js';
import { dropCachedPages, zeroRange } from '../image/sparse.js';
import { type Db, nowIso } from '../storage/db.js';
import type { Page, PageRequest } from '../storage/paging.js';
import type { Vdi, VdiStore } from '../storage/vdis.js';
import type { RunningTask, TaskManager } from '../tasks/task-manager.js';
import type { Task } from '../tasks/task-store.js';
import { commitStaged } from './commit.js';
import { type LandOptions, landStream } from './land-stream.js';
import { RangeSet } from './range-set.js';
import {
  hashToken,
  isExpired,
  isOneShot,
  nextEpoch,
  ONE_SHOT_KEY,
  streamDestOf,
  type TransferJson,
  toJson,
  tokenMatches,
  touch,
} from './session-record.js';
import { type Live, SessionRegistry } from './session-registry.js';
import { StreamingImport } from './streaming-import.js';
import type { Direction, Transfer } from './transfer-store.js';

import { checkDeclaredSize, parseChecksum, uploadLimit, verifyChecksum } from './upload-rules.js';

export const DEFAULT_TTL_SECONDS = 3600;
export const MAX_TTL_SECONDS = 7 * 24 * 3600;
const CHECKPOINT_INTERVAL_MS = 1000;
const REAP_INTERVAL_MS = 5000;

export interface CreateTransfer {
  vdi: string;
  direction: Direction;
  format?: string;
  size?: number;
  checksum?: string;
  ttl_seconds?: number;
  metadata?: Record<string, string>;
  /** Pull: where diskport fetches the image from (recorded on the row). */
  source_url?: string;
  /** Push: where diskport sends the disk (recorded on the row, without its token). */
  target_url?: string;
}

/** A chunk's place: `bytes start-end/total` (end inclusive, total null for `*`). */
export interface ChunkRange {
  start: number;
  end: number;
  total: number | null;
}

export interface ChunkWrite {
  range?: ChunkRange;
  /** Digest of the request body (`Content-Digest`, tus `Upload-Checksum`): algorithm and raw digest. */
  digest?: { algorithm: 'sha256' | 'sha512' | 'sha1' | 'md5'; value: Buffer };
  /** The one-shot import writes a fresh file from 0: zeros need no punching. */
  fresh?: boolean;
  /** Called once every check has passed, just before the body is read (HTTP's 100 Continue). */
  beforeBody?: () => void;
  /** A body shorter than `range` is fine: its bytes are kept (a tus PATCH may stop anywhere). */
  partial?: boolean;
}

export class TransferService {
  private readonly sessions: SessionRegistry;
  private reaper: NodeJS.Timeout | null = null;

  constructor(
    db: Db,
    private readonly vdis: VdiStore,
    private readonly tasks: TaskManager,
    private readonly logger?: Logger,
  ) {
    this.sessions = new SessionRegistry(db);
  }

  /** Sessions a previous process left active: their tasks and staging files must survive recovery. */
  activeAtStartup(): { tasks: Set<string>; staging: Set<string> } {
    const active = this.sessions.store.list({ active: true }).filter((t) => !isOneShot(t));
    return {
      tasks: new Set(active.map((t) => t.task_id)),
      staging: new Set(active.flatMap((t) => (t.staging_path ? [t.staging_path, streamDestOf(t)] : []))),
    };
  }

  /** Startup: takes active sessions back; a finalize that was running is run again from the staged bytes. */
  resume(): void {
    for (const t of this.sessions.store.list({ active: true })) {
      if (isOneShot(t)) {
        // Nobody holds a one-shot import's session: it died with its request.
        t.state = 'failed';
        this.sessions.store.save(t);
        continue;
      }
      try {
        const live = this.attach(t, this.tasks.adopt(t.task_id, t.format));
        if (t.state === 'finalizing') {
          this.logger?.info({ transfer: t.id }, 'finishing a finalize interrupted by a restart');
          live.finalizing = this.runFinalize(live);
        }
      } catch (err) {
        this.logger?.error({ err, transfer: t.id }, 'could not resume transfer');
      }
    }
    this.reaper = setInterval(() => void this.reapExpired(), REAP_INTERVAL_MS);
    this.reaper.unref();
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

  async create(req: CreateTransfer): Promise<{ transfer: Transfer; token: string }> {
    const vdi = this.vdis.get(req.vdi);
    const format = codecFor(req.format ?? 'raw').name;
    const ttl = req.ttl_seconds ?? DEFAULT_TTL_SECONDS;
    if (!Number.isInteger(ttl) || ttl < 1 || ttl > MAX_TTL_SECONDS) {
      throw new ApiError(
        'INVALID_REQUEST',
        `ttl_seconds must be between 1 and ${MAX_TTL_SECONDS}, got ${ttl}`,
      );
    }
    if (req.checksum !== undefined) parseChecksum(req.checksum);
    if (req.size !== undefined) checkDeclaredSize(req.size, format, vdi);
    if (req.direction === 'download' && (req.size !== undefined || req.checksum !== undefined)) {
      throw new ApiError(
        'INVALID_REQUEST',
        'size and checksum describe an upload; a download session takes neither',
      );
    }

    const id = randomUUID();
    const token = randomBytes(32).toString('base64url');
    const taskId = randomUUID();
    const upload = req.direction === 'upload';
    const staging = upload ? this.vdis.stagingPath(vdi, `transfer-${id}.${format}`) : null;
    const now = Date.now();
    const t: Transfer = {
      id,
      vdi_id: vdi.id,
      direction: req.direction,
      format,
      size: req.size ?? null,
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
      metadata: req.metadata ?? null,
    };
    // One writer per VDI: take the lock before anything is created.
    const release = upload ? this.vdis.locks.acquire(vdi.id, `transfer ${id}`) : () => {};
    // The content is about to be replaced: its cached pages only crowd the new ones out.
    if (upload) await dropCachedPages(this.vdis.imagePath(vdi));
    try {
      if (staging) {
        const h = await fsp.open(staging, 'w');
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
   * Offset and length once the writes in progress have ended (at most
   * `maxWaitMs`). A client that lost its connection asks at once; the server
   * may not yet have seen the break and recorded the bytes that did arrive,
   * and an offset read then would make the client send them again.
   */
  async settledUploadState(id: string, maxWaitMs = 2000): Promise<{ offset: number; length: number | null }> {
    const live = this.sessions.find(id);
    if (live) await quiet(live, maxWaitMs);
    return this.uploadState(id);
  }

  /**
   * Before a finalize: writes still running when every byte has arrived
   * carry nothing the session needs. Typically their client vanished without
   * closing the connection (a dropped link) and came back on another one;
   * left alone, such a request would hold the session busy until the idle
   * timeout. They are ended now, and told why.
   */
  async endRedundantWrites(id: string, maxWaitMs = 5000): Promise<void> {
    const live = this.sessions.find(id);
    if (!live || live.writers === 0 || live.finalizing || live.t.size === null) return;
    if (live.ranges.missing(0, live.t.size).length) return;
    const reason = new ApiError(
      'CHUNK_SUPERSEDED',
      'the session was finalized while this chunk was still arriving; every byte of it had already arrived in other requests, so nothing was lost',
    );
    for (const c of live.writeAborts) c.abort(reason);
    await quiet(live, maxWaitMs);
  }

  /** Offset and length for HEAD. */
  uploadState(id: string): { offset: number; length: number | null } {
    const live = this.sessions.find(id);
    const t = live?.t ?? this.get(id);
    const ranges = live?.ranges ?? new RangeSet(t.received);
    return { offset: ranges.contiguousFromZero(), length: t.size };
  }

  /** Lands one chunk (or the whole stream) of an upload; returns the session after it. */
  async write(id: string, body: Readable, chunk: ChunkWrite = {}): Promise<Transfer> {
    const live = this.active(id, 'upload');
    const t = live.t;
    if (t.state !== 'open') {
      throw new ApiError('TRANSFER_NOT_OPEN', `transfer ${id} is ${t.state}; it takes no more data`);
    }
    const vdi = this.vdis.get(t.vdi_id);
    const range = chunk.range;
    if (range) await this.learnTotal(live, range.total, vdi);
    const start = range?.start ?? 0;
    const limit = uploadLimit(t.format, vdi.virtual_size);
    const total = t.size;
    if (range && range.end >= (total ?? limit)) {
      throw new ApiError(
        'CHUNK_PAST_END',
        `chunk bytes ${range.start}-${range.end} lands past the declared total of ${total} bytes`,
        { total, chunk_end: range.end },
      );
    }
    const expected = range ? range.end - range.start + 1 : (total ?? limit) - start;
    const progress = { written: 0 };
    live.writers++;
    const superseded = new AbortController();
    live.writeAborts.add(superseded);
    let recorded = start;
    // The one-shot import's session has no holder to resume it: nothing to make durable early.
    const durable = !chunk.fresh;
    let handle: fsp.FileHandle | null = null;
    let streaming: StreamingImport | null = null;
    // Records run one at a time (checkpoints and the end of the write), so
    // `recorded` only grows and the catch below can wait for the last one.
    let recording: Promise<void> = Promise.resolve();
    let writer: DirectWriter | null = null;
    const recordNow = async (end: number) => {
      if (end <= recorded || !handle) return;
      // What the writer still gathers is not in the file yet.
      await writer?.flush();
      if (durable) {
        await handle.datasync();
        await (await live.streaming)?.sync();
      }
      live.ranges.add(recorded, end);
      streaming?.recorded(end);
      recorded = end;
      this.persistProgress(live);
    };
    const record = (end: number): Promise<void> => {
      const next = recording.then(() => recordNow(end));
      recording = next.catch(() => {});
      return next;
    };
    let checkpoints: NodeJS.Timeout | null = null;
    try {
      handle = await this.handleOf(live);
      const candidate = await this.streamingOf(live, vdi);
      if (candidate && (await candidate.claim(start, live.ranges, handle))) streaming = candidate;
      // Not while streaming: the layout reads the staged metadata back as soon as it is written.
      else if (!chunk.digest && t.staging_path) writer = await DirectWriter.open(t.staging_path, handle);
      const writable = chunk.fresh ? undefined : (s: number, e: number) => live.ranges.missing(s, e);
      const landing: LandOptions = {
        offset: start,
        limit: expected,
        tooLarge: (n: number) =>
          range
            ? new ApiError(
                'CHUNK_TOO_LONG',
                `the body is longer than its Content-Range bytes ${range.start}-${range.end} (${n} bytes or more)`,
              )
            : new ApiError(
                'TOO_LARGE',
                `upload is larger than ${total !== null ? `the declared ${total} bytes` : `the VDI allows (${formatBytes(limit)})`}`,
                { limit: total ?? limit },
              ),
        signal: AbortSignal.any([live.task.signal, superseded.signal]),
        zeros: chunk.fresh ? 'skip' : 'punch',
        writable,
        progress,
        writer: writer ?? undefined,
        route: streaming
          ? (buf, n, at, stage) => streaming!.write(buf, n, at, stage, { writable, punchZeros: !chunk.fresh })
          : undefined,
      };
      chunk.beforeBody?.();
      let received: number;
      if (chunk.digest) {
        // A chunk with a digest counts only if it matches, so it lands aside
        // first and reaches the staging file only once verified: a bad one
        // never touches bytes that a parallel chunk delivers.
        received = await this.landVerified(live, body, handle!, landing, chunk.digest);
      } else {
        checkpoints = setInterval(
          durable
            ? () => void record(start + progress.written).catch(() => {})
            : // Nothing to make durable early, but the task still shows how far the upload is.
              () => live.task.setBytesDone(live.ranges.size() + progress.written),
          CHECKPOINT_INTERVAL_MS,
        );
        received = await landStream(body, handle!, landing);
      }
      if (range && received < expected && !chunk.partial) {
        await record(start + received);
        throw new ApiError(
          'CHUNK_INCOMPLETE',
          `the body ended after ${received} of the ${expected} bytes of its Content-Range; the bytes that arrived were kept, send the rest`,
          { received },
        );
      }
      if (!range && total === null) await this.learnTotal(live, received, vdi);
      await record(start + received);
      return t;
    } catch (err) {
      // A broken connection keeps what arrived (unless a digest must vouch for it first).
      if (!chunk.digest && !(err instanceof ApiError && err.code === 'CHUNK_TOO_LONG')) {
        await record(start + progress.written).catch(() => {});
      }
      // Bytes that streamed into the disk but do not count as received will come again, maybe otherwise.
      await recording;
      if (streaming?.hasUnrecorded()) await streaming.abandon();
      throw err;
    } finally {
      if (checkpoints) clearInterval(checkpoints);
      // Bytes it still gathers were not recorded (a body longer than its range): dropped.
      await writer?.close();
      streaming?.release();
      live.writeAborts.delete(superseded);
      this.doneWriting(live);
    }
  }

  /**
   * Lands a chunk in a file of its own, checks its digest, then copies it into
   * the staging file (bytes not yet received only). Returns the bytes received.
   */
  private async landVerified(
    live: Live,
    body: AsyncIterable<Buffer>,
    staging: fsp.FileHandle,
    landing: LandOptions,
    digest: NonNullable<ChunkWrite['digest']>,
  ): Promise<number> {
    const aside = `${live.t.staging_path}.chunk-${randomUUID()}`;
    const hash = createHash(digest.algorithm);
    const file = await fsp.open(aside, 'w+');
    try {
      const received = await landStream(body, file, {
        ...landing,
        offset: 0,
        zeros: 'skip',
        writable: undefined,
        progress: undefined,
        route: undefined,
        onChunk: (c) => hash.update(c),
      });
      if (!hash.digest().equals(digest.value)) {
        throw new ApiError(
          'DIGEST_MISMATCH',
          'Content-Digest does not match the bytes received; the chunk was discarded, send it again',
        );
      }
      const verified = await RawFileImage.open(aside, { virtualSize: received });
      try {
        const extents = await verified.extents();
        await landStream(readVirtual(verified, extents, 0, received), staging, {
          ...landing,
          signal: undefined,
        });
      } finally {
        await verified.close();
      }
      return received;
    } finally {
      await file.close();
      await fsp.rm(aside, { force: true });
    }
  }

  private async handleOf(live: Live): Promise<fsp.FileHandle> {
    // One open for all the writers of a session, however many ask at once.
    live.handle ??= fsp.open(live.t.staging_path!, 'r+').catch((err) => {
      live.handle = null; // a failed open is not cached: the next write tries again
      throw err;
    });
    const handle = await live.handle;
    // The session may have ended while the file opened: its handle is nobody's.
    if (this.sessions.find(live.t.id) !== live) {
      await handle.close().catch(() => {});
      throw new ApiError('TRANSFER_NOT_ACTIVE', `transfer ${live.t.id} is ${live.t.state}; open a new one`);
    }
    return handle;
  }

  /**
   * The session's streaming import, opened on first use: a vhd or qcow2
   * upload into a raw VDI, unless a whole-upload checksum must be computed
   * over the staged file.
   */
  private streamingOf(live: Live, vdi: Vdi): Promise<StreamingImport | null> {
    const t = live.t;
    if (t.format === 'raw' || vdi.image_format !== 'raw' || t.checksum || !t.staging_path) {
      return Promise.resolve(null);
    }
    live.streaming ??= StreamingImport.open({
      format: t.format,
      fileSize: t.size,
      destPath: streamDestOf(t),
      diskSize: vdi.virtual_size,
      stagingPath: t.staging_path,
      received: live.ranges,
    }).catch((err) => {
      live.streaming = null;
      throw err;
    });
    return live.streaming;
  }

  /** A write ends: the session is renewed, its progress saved, and waiters for quiet woken. */
  private doneWriting(live: Live): void {
    live.writers--;
    touch(live.t);
    this.persistProgress(live);
    if (live.writers === 0) for (const wake of live.idleWaiters.splice(0)) wake();
  }

  /** Fixes the length of an upload without sending bytes (`Content-Range: bytes *\/total`). */
  async declareTotal(id: string, total: number): Promise<Transfer> {
    const live = this.active(id, 'upload');
    await this.learnTotal(live, total, this.vdis.get(live.t.vdi_id));
    return live.t;
  }

  /** The first chunk naming a total fixes it; later ones must agree. */
  private async learnTotal(live: Live, total: number | null, vdi: Vdi): Promise<void> {
    if (total === null) return;
    const t = live.t;
    if (t.size !== null && t.size !== total) {
      throw new ApiError(
        'CONFLICTING_LENGTH',
        `this chunk says the upload is ${total} bytes, but it was declared as ${t.size}`,
        { declared: t.size, chunk_total: total },
      );
    }
    if (t.size === null) {
      checkDeclaredSize(total, t.format, vdi);
      t.size = total;
      live.task.setTotal(total);
      if (t.format !== 'raw') await (await this.handleOf(live)).truncate(total);
      this.sessions.store.save(t);
    }
  }

  private persistProgress(live: Live): void {
    live.t.received = live.ranges.toJSON();
    live.task.record.bytes_done = live.ranges.size();
    live.task.setTotal(live.t.size);
    this.sessions.store.save(live.t);
    this.tasks.persist(live.task.record);
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
      const streaming = await this.streamingOf(live, vdi);
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
      const cleaned = this.cleanup(live);
      const done = task.succeed(result(committed.generation));
      await cleaned;
      return done;
    } catch (err) {
      const failed = await this.end(live, 'failed', err);
      return failed ?? task.record;
    }
  }

  /** Cancels an active session: the VDI stays as it was. */
  async cancel(id: string): Promise<Transfer> {
    const live = this.active(id);
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
  private async completeDownload(live: Live, result: Record<string, unknown> = {}): Promise<void> {
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
  private async end(
    live: Live,
    state: 'cancelled' | 'expired' | 'failed',
    reason: unknown,
  ): Promise<Task | null> {
    if (!this.sessions.isCurrent(live)) return null;
    live.failure = toApiError(reason);
    live.t.state = state;
    this.sessions.store.save(live.t);
    // Writes still landing stop now, with a clear answer, before their file is closed.
    live.task.requestCancel(`the transfer is ${state}`);
    const cleaned = this.cleanup(live);
    const task = live.task.fail(live.failure);
    await cleaned;
    return task;
  }

  private async cleanup(live: Live): Promise<void> {
    // The VDI is free as soon as the session is over: whoever saw its task
    // finish may open the next one at once. Its staging file has its own name.
    this.sessions.remove(live);
    live.release();
    const handle = live.handle;
    live.handle = null;
    await handle?.then((h) => h.close()).catch(() => {});
    const streaming = live.streaming;
    live.streaming = null;
    await streaming?.then((s) => s?.close()).catch(() => {});
    if (live.t.staging_path) {
      await fsp.rm(live.t.staging_path, { force: true });
      await fsp.rm(streamDestOf(live.t), { force: true });
    }
  }

  /** Counts bytes a download session served. */
  countServed(id: string, n: number): void {
    const live = this.sessions.find(id);
    if (!live) return;
    live.task.addBytes(n);
    // A long download is activity: it keeps the session alive (saved at most once a second).
    const now = Date.now();
    if (now - Date.parse(live.t.expires_at) + live.t.ttl_seconds * 1000 >= 1000) this.renew(id);
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
      await this.end(live, 'failed', err);
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

  /**
   * Runs work done on an active session's behalf in the background (pull,
   * push), bound to its task: cancelling the task aborts the task's signal. A
   * job that throws ends the session as failed (the VDI stays as it was); a
   * download session whose job returns ends with the job's result.
   */
  runJob(id: string, job: (task: RunningTask) => Promise<Record<string, unknown> | undefined>): void {
    const live = this.active(id);
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

  /** Forgets every byte an upload received (its source changed): the staging file reads as zeros again. */
  async reset(id: string, size: number | null = null): Promise<Transfer> {
    const live = this.active(id, 'upload');
    if (live.t.state !== 'open' || live.writers > 0) {
      throw new ApiError('TRANSFER_BUSY', `transfer ${id} is ${live.t.state} or being written; cannot reset`);
    }
    const vdi = this.vdis.get(live.t.vdi_id);
    if (size !== null) checkDeclaredSize(size, live.t.format, vdi);
    // Forget the bytes first: a crash between the two must not leave zeroed
    // bytes counted as received. A new epoch names a new disk for a streaming
    // import, so the old one can never be taken for the new upload's.
    const oldDest = live.t.staging_path ? streamDestOf(live.t) : null;
    live.ranges = new RangeSet();
    live.t.size = size;
    nextEpoch(live.t);
    this.persistProgress(live);
    const oldStreaming = live.streaming;
    live.streaming = null;
    try {
      const handle = await this.handleOf(live);
      await handle.truncate(0);
      await handle.truncate(live.t.format === 'raw' ? vdi.virtual_size : (size ?? 0));
      await handle.datasync();
    } finally {
      // The old epoch's disk and layout belong to bytes that no longer count.
      await oldStreaming?.then((s) => s?.close()).catch(() => {});
      if (oldDest) await fsp.rm(oldDest, { force: true });
    }
    return live.t;
  }

  /** Makes [start, end] of an upload zeros without their bytes crossing the wire (ovirt-imageio's zero op). */
  async zero(id: string, range: ChunkRange): Promise<Transfer> {
    const live = this.active(id, 'upload');
    const t = live.t;
    if (t.state !== 'open') {
      throw new ApiError('TRANSFER_NOT_OPEN', `transfer ${id} is ${t.state}; it takes no more data`);
    }
    const vdi = this.vdis.get(t.vdi_id);
    await this.learnTotal(live, range.total, vdi);
    const end = range.end + 1;
    const limit = t.size ?? uploadLimit(t.format, vdi.virtual_size);
    if (end > limit) {
      throw new ApiError(
        'CHUNK_PAST_END',
        `zero range ${range.start}-${range.end} lands past the end of the upload (${limit} bytes)`,
        { limit, chunk_end: range.end },
      );
    }
    live.writers++;
    try {
      const handle = await this.handleOf(live);
      const missing = live.ranges.missing(range.start, end);
      for (const [s, e] of missing) await zeroRange(handle, s, e - s);
      if (missing.length) await handle.datasync();
      for (const [s, e] of missing) live.ranges.add(s, e);
      live.task.markCovered(missing.reduce((n, [s, e]) => n + e - s, 0));
      return t;
    } finally {
      this.doneWriting(live);
    }
  }

  /** Are there active sessions on this VDI? (VDI deletion must wait.) */
  activeOn(vdiId: string): Transfer[] {
    return this.sessions
      .all()
      .filter((l) => l.t.vdi_id === vdiId)
      .map((l) => l.t);
  }
}

/** Resolves when no write of the session is in progress, or after `maxWaitMs`. */
function quiet(live: Live, maxWaitMs: number): Promise<void> {
  if (live.writers === 0) return Promise.resolve();
  return new Promise<void>((resolve) => {
    const wake = () => {
      clearTimeout(timer);
      resolve();
    };
    const timer = setTimeout(() => {
      const i = live.idleWaiters.indexOf(wake);
      if (i >= 0) live.idleWaiters.splice(i, 1);
      resolve();
    }, maxWaitMs);
    live.idleWaiters.push(wake);
  });
}
