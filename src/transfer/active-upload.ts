/**
 * The active upload: bytes landing in a session's staging file. Chunks land
 * at their offsets, in any order, in parallel, repeating bytes already sent;
 * only bytes not yet received are written, so a resend can never damage what
 * arrived. A chunk with a digest counts only once it matches.
 *
 * Durability (the fsync policy): a range counts as received only after
 * fdatasync of the staging file, and is then recorded in SQLite. So the
 * Upload-Offset that HEAD reports is always on disk. A long stream sent
 * without Content-Range is checkpointed every CHECKPOINT_INTERVAL_MS the same
 * way, and a broken connection keeps the bytes that arrived. The cost is one
 * fdatasync per chunk and per second of streaming, unless the client defers
 * it (`flush=n`): then the bytes wait for the session's next flush point
 * (flush.ts).
 */
import { createHash, randomUUID } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import type { Readable } from 'node:stream';
import { ApiError, formatBytes } from '../errors.js';
import { DIRECT_BUFFER_BYTES, DirectWriter } from '../image/direct-writer.js';
import { PRIVATE_FILE_MODE } from '../image/file-io.js';
import { RawFileImage } from '../image/raw-file-image.js';
import { readVirtual } from '../image/read-virtual.js';
import { spaceError, spaceGuardOf } from '../image/space.js';
import { zeroRange } from '../image/sparse.js';
import { StreamedDigests } from '../storage/streamed-digests.js';
import type { Vdi, VdiStore } from '../storage/vdis.js';
import type { TaskManager } from '../tasks/task-manager.js';
import { Flusher, unflushedBytes } from './flush.js';
import { type LandOptions, landBuffer, landStream } from './land-stream.js';
import { type ByteRange, RangeSet } from './range-set.js';
import { nextEpoch, streamDestOf, touch } from './session-record.js';
import type { Live, SessionRegistry } from './session-registry.js';
import { readSmallBody, releaseSmallBody, smallChunkRange, WriteEnd } from './small-chunk.js';
import { StreamingImport } from './streaming-import.js';
import type { Transfer } from './transfer-store.js';
import { checkDeclaredSize, spaceNeeded, uploadLimit } from './upload-rules.js';

const CHECKPOINT_INTERVAL_MS = 1000;

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
  /**
   * Every byte lands, received before or not: the last write of a byte wins,
   * as on a disk (ovirt-imageio tickets, whose clients may zero a range and
   * then write it). Without it only bytes not yet received are written.
   */
  overwrite?: boolean;
  /** A body shorter than `range` is fine: its bytes are kept (a tus PATCH may stop anywhere). */
  partial?: boolean;
  /**
   * false (`flush=n`): the bytes are written, not made durable; they count as
   * received at the session's next flush point. Default true.
   */
  flush?: boolean;
}

export class ActiveUploads {
  private readonly flusher: Flusher;

  constructor(
    private readonly sessions: SessionRegistry,
    private readonly vdis: VdiStore,
    private readonly tasks: TaskManager,
  ) {
    this.flusher = new Flusher(sessions, (live) => this.persistProgress(live));
  }

  /** A flush point: what the session's writes left unflushed becomes durable, then counts as received. */
  async flush(id: string): Promise<Transfer> {
    const live = this.sessions.active(id, 'upload');
    await this.flusher.flush(live);
    return live.t;
  }

  /** Every active session's flush point (a graceful shutdown). */
  async flushAll(): Promise<void> {
    await Promise.allSettled(this.sessions.all().map((live) => this.flusher.flush(live)));
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
    const arrived = live.ranges.missing(0, live.t.size).every(([s, e]) => live.unflushed.covers(s, e));
    if (!arrived) return;
    const reason = new ApiError(
      'CHUNK_SUPERSEDED',
      'the session was finalized while this chunk was still arriving; every byte of it had already arrived in other requests, so nothing was lost',
    );
    for (const w of live.writeAborts) w.end(reason);
    await quiet(live, maxWaitMs);
  }

  /** Offset and length for HEAD. */
  uploadState(id: string): { offset: number; length: number | null } {
    const live = this.sessions.find(id);
    const t = live?.t ?? this.sessions.get(id);
    const ranges = live?.ranges ?? new RangeSet(t.received);
    return { offset: ranges.contiguousFromZero(), length: t.size };
  }

  /**
   * Every range written so far, durable or not: what a read through the
   * session (an imageio read-write ticket) takes from the staging file.
   */
  writtenRanges(id: string): ByteRange[] {
    const live = this.sessions.active(id, 'upload');
    const all = new RangeSet(live.ranges.toJSON());
    for (const set of [live.unflushed, live.flushingBatch]) {
      for (const [s, e] of set?.toJSON() ?? []) all.add(s, e);
    }
    return all.toJSON();
  }

  /** Bytes written with `flush=n` that no flush point has made durable yet. */
  unflushedBytes(id: string): number {
    const live = this.sessions.find(id);
    return live ? unflushedBytes(live) : 0;
  }

  /** Lands one chunk (or the whole stream) of an upload; returns the session after it. */
  async write(id: string, body: Readable, chunk: ChunkWrite = {}): Promise<Transfer> {
    const live = this.sessions.active(id, 'upload');
    const t = live.t;
    if (t.state !== 'open') {
      throw new ApiError('TRANSFER_NOT_OPEN', `transfer ${id} is ${t.state}; it takes no more data`);
    }
    live.rawDigests = null;
    const small = smallChunkRange(t, chunk);
    if (small) return this.writeSmall(live, body, small, chunk);
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
    // Renewed now, so the flush point that records this write saves the new expiry too.
    touch(t);
    const superseded = new AbortController();
    const ender = { end: (reason: unknown) => superseded.abort(reason) };
    live.writeAborts.add(ender);
    let recorded = start;
    // The one-shot import's session has no holder to resume it: nothing to make durable early.
    const durable = !chunk.fresh;
    // Deferred (flush=n): set once the stream is claimed or not, below.
    let deferred = false;
    let handle: fsp.FileHandle | null = null;
    let streaming: StreamingImport | null = null;
    // Records run one at a time (checkpoints and the end of the write), so
    // `recorded` only grows and the catch below can wait for the last one.
    let recording: Promise<void> = Promise.resolve();
    // Whether the session was saved after the last record (a flush point saves it).
    let saved = true;
    let writer: DirectWriter | null = null;
    let rawDigests: StreamedDigests | null = null;
    const recordNow = async (end: number) => {
      if (end <= recorded || !handle) return;
      // What the writer still gathers is not in the file yet.
      await writer?.flush();
      if (!durable) {
        live.ranges.add(recorded, end);
        this.persistProgress(live);
      } else if (deferred) {
        this.flusher.wrote(live, recorded, end);
      } else {
        // A flush point: these bytes and every unflushed one before them, in one fdatasync.
        live.unflushed.add(recorded, end);
        saved = false;
        await this.flusher.flush(live);
        saved = true;
      }
      streaming?.recorded(end);
      recorded = end;
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
      // Nor for a chunk smaller than one gathered write: O_DIRECT would make
      // each small request wait for the device (and open a descriptor), where
      // the page cache takes it at once and a flush point writes it out.
      // Nor for a delta (base): its commit reads every staged byte back at
      // once, from the page cache rather than from the device.
      else if (!chunk.digest && t.staging_path && !t.base && !(range && expected < DIRECT_BUFFER_BYTES)) {
        writer = await DirectWriter.open(t.staging_path, handle);
      }
      // What streams into the disk being built is made durable at the end of
      // its request whatever the client asked (ovirt-imageio allows a flush
      // anyway): its bookkeeping (streaming-import.ts) spans one claim only.
      deferred = durable && chunk.flush === false && !streaming;
      // The one-shot raw import writes every byte it receives, in order, into a fresh
      // file that is the disk: its digests are hashed on the way, not read back at the commit.
      if (chunk.fresh && t.format === 'raw' && !chunk.digest) {
        rawDigests = new StreamedDigests(vdi.virtual_size);
        live.rawDigests = rawDigests;
      }
      const writable =
        chunk.fresh || chunk.overwrite ? undefined : (s: number, e: number) => live.ranges.missing(s, e);
      const landing: LandOptions = {
        offset: start,
        limit: expected,
        tooLarge: (n: number) =>
          range
            ? chunkTooLong(range, n)
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
        space: t.staging_path ? spaceGuardOf(t.staging_path) : null,
        onChunk: rawDigests ? feedFrom(rawDigests, start) : undefined,
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
        throw chunkIncomplete(received, expected);
      }
      if (!range && total === null) await this.learnTotal(live, received, vdi, received);
      await record(start + received);
      return t;
    } catch (err) {
      live.rawDigests = null;
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
      live.writeAborts.delete(ender);
      // Saved already by the flush point that recorded it, or at the next one (deferred).
      this.doneWriting(live, !saved);
    }
  }

  /**
   * A small chunk (small-chunk.ts): read whole, written at its place, then
   * recorded as `write` records it: at the next flush point (`flush=n`) or
   * at one now. What arrived of a broken body is kept, as there.
   */
  private async writeSmall(
    live: Live,
    body: Readable,
    range: ChunkRange,
    chunk: ChunkWrite,
  ): Promise<Transfer> {
    const t = live.t;
    const start = range.start;
    live.writers++;
    // Renewed for the flush point this write makes (flush=n: doneWriting renews it).
    if (chunk.flush !== false) touch(t);
    const ender = new WriteEnd();
    live.writeAborts.add(ender);
    // Cancelled before this write began: the session's listener has run already.
    if (live.task.signal.aborted) ender.end(live.task.signal.reason);
    let saved = true;
    try {
      const handle = live.openHandle ?? (await this.handleOf(live));
      chunk.beforeBody?.();
      const got = await readSmallBody(body, range.end - start + 1, ender);
      if (got.tooLong) throw chunkTooLong(range, got.tooLong);
      const end = start + got.received;
      if (end > start) {
        live.space ??= spaceGuardOf(t.staging_path!);
        await landBuffer(handle, got.buf, got.received, start, {
          zeros: 'punch',
          writable: chunk.overwrite ? undefined : (s, e) => live.ranges.missing(s, e),
          space: live.space,
        }).catch((err) => {
          throw spaceError(err, 'the upload');
        });
        releaseSmallBody(got);
        if (chunk.flush === false) this.flusher.wrote(live, start, end);
        else {
          live.unflushed.add(start, end);
          saved = false;
          await this.flusher.flush(live);
          saved = true;
        }
      }
      if (got.error) throw got.error;
      if (end <= range.end) {
        throw chunkIncomplete(got.received, range.end - start + 1);
      }
      return t;
    } finally {
      live.writeAborts.delete(ender);
      this.doneWriting(live, !saved);
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
    const file = await fsp.open(aside, 'w+', PRIVATE_FILE_MODE);
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

  async handleOf(live: Live): Promise<fsp.FileHandle> {
    // One open for all the writers of a session, however many ask at once.
    live.handle ??= fsp.open(live.t.staging_path!, 'r+').catch((err) => {
      live.handle = null; // a failed open is not cached: the next write tries again
      throw err;
    });
    const opening = live.handle;
    const handle = await opening;
    // The session may have ended while the file opened: its handle is nobody's.
    if (this.sessions.find(live.t.id) !== live) {
      await handle.close().catch(() => {});
      throw new ApiError('TRANSFER_NOT_ACTIVE', `transfer ${live.t.id} is ${live.t.state}; open a new one`);
    }
    // Opened, and the session's: small chunks take it without waiting on the promise.
    if (live.handle === opening) live.openHandle = handle;
    return handle;
  }

  /**
   * The session's streaming import, opened on first use: a vhd or qcow2
   * upload into a raw VDI, unless a whole-upload checksum must be computed
   * over the staged file. A qcow2 delta (base) into a raw VDI too: its data
   * streams into a raw file at its guest offsets, which its commit takes as
   * the new layer instead of writing the data a second time (commit.ts).
   */
  streamingOf(live: Live, vdi: Vdi): Promise<StreamingImport | null> {
    const t = live.t;
    // A vhd delta is staged whole: it is laid onto the VDI's content at finalize.
    if (t.format === 'raw' || vdi.image_format !== 'raw' || t.checksum || !t.staging_path) {
      return Promise.resolve(null);
    }
    if (t.base && t.format !== 'qcow2') return Promise.resolve(null);
    live.streaming ??= StreamingImport.open({
      format: t.format,
      fileSize: t.size,
      destPath: streamDestOf(t),
      diskSize: vdi.virtual_size,
      stagingPath: t.staging_path,
      received: live.ranges,
      differencing: t.base !== null,
    }).catch((err) => {
      live.streaming = null;
      throw err;
    });
    return live.streaming;
  }

  /**
   * A write ends: the session is renewed, its progress saved (a deferred
   * write's at its flush point), and waiters for quiet woken.
   */
  private doneWriting(live: Live, save = true): void {
    live.writers--;
    touch(live.t);
    if (save) this.persistProgress(live);
    if (live.writers === 0 && live.idleWaiters.length > 0)
      for (const wake of live.idleWaiters.splice(0)) wake();
  }

  /** Fixes the length of an upload without sending bytes (`Content-Range: bytes *\/total`). */
  async declareTotal(id: string, total: number): Promise<Transfer> {
    const live = this.sessions.active(id, 'upload');
    await this.learnTotal(live, total, this.vdis.get(live.t.vdi_id));
    return live.t;
  }

  /** The first chunk naming a total fixes it; later ones must agree. `landed`: bytes written, not yet recorded. */
  private async learnTotal(live: Live, total: number | null, vdi: Vdi, landed = 0): Promise<void> {
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
      const have = live.ranges.size() + landed;
      await this.vdis.ensureSpace(vdi, spaceNeeded(total, have, t.format, vdi, t.checksum), 'the upload');
      t.size = total;
      live.task.setTotal(total);
      if (t.format !== 'raw') await (await this.handleOf(live)).truncate(total);
      this.sessions.store.save(t);
    }
  }

  /**
   * Saves the session's received ranges and its task's progress in one
   * transaction: a flush point's one commit (one sync of the database's
   * journal), not one per row.
   */
  persistProgress(live: Live): void {
    live.t.received = live.ranges.toJSON();
    live.task.record.bytes_done = live.ranges.size();
    live.task.setTotal(live.t.size);
    this.sessions.db.transaction(() => {
      this.sessions.store.save(live.t);
      this.tasks.persist(live.task.record);
    })();
  }

  /** Forgets every byte an upload received (its source changed): the staging file reads as zeros again. */
  async reset(id: string, size: number | null = null): Promise<Transfer> {
    const live = this.sessions.active(id, 'upload');
    if (live.t.state !== 'open' || live.writers > 0) {
      throw new ApiError('TRANSFER_BUSY', `transfer ${id} is ${live.t.state} or being written; cannot reset`);
    }
    live.rawDigests = null;
    const vdi = this.vdis.get(live.t.vdi_id);
    if (size !== null) checkDeclaredSize(size, live.t.format, vdi);
    // Forget the bytes first: a crash between the two must not leave zeroed
    // bytes counted as received. A new epoch names a new disk for a streaming
    // import, so the old one can never be taken for the new upload's.
    const oldDest = live.t.staging_path ? streamDestOf(live.t) : null;
    // Unflushed bytes are forgotten too, and a flush that took some already must not record them after.
    live.unflushed = new RangeSet();
    await (live.nextFlush ?? live.flushing)?.catch(() => {});
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

  /**
   * Makes [start, end] of an upload zeros without their bytes crossing the
   * wire (ovirt-imageio's zero op); `flush: false` leaves them for the next
   * flush point.
   */
  async zero(id: string, range: ChunkRange, flush = true, overwrite = false): Promise<Transfer> {
    const live = this.sessions.active(id, 'upload');
    // Bytes changed other than by the one-shot's stream: its digests no longer tell the disk.
    live.rawDigests = null;
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
      const missing: ByteRange[] = overwrite ? [[range.start, end]] : live.ranges.missing(range.start, end);
      for (const [s, e] of missing) await zeroRange(handle, s, e - s);
      live.task.markCovered(missing.reduce((n, [s, e]) => n + e - s, 0));
      if (flush) {
        for (const [s, e] of missing) live.unflushed.add(s, e);
        await this.flusher.flush(live);
      } else {
        for (const [s, e] of missing) this.flusher.wrote(live, s, e);
      }
      return t;
    } finally {
      this.doneWriting(live, flush);
    }
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

/** Feeds each chunk of a stream landing at `start` to `digests`, at its place. */
function feedFrom(digests: StreamedDigests, start: number): (chunk: Buffer) => void {
  let at = start;
  return (chunk) => {
    digests.feed(chunk, at);
    at += chunk.length;
  };
}

function chunkTooLong(range: { start: number; end: number }, atLeast: number): ApiError {
  return new ApiError(
    'CHUNK_TOO_LONG',
    `the body is longer than its Content-Range bytes ${range.start}-${range.end} (${atLeast} bytes or more)`,
  );
}

function chunkIncomplete(received: number, expected: number): ApiError {
  return new ApiError(
    'CHUNK_INCOMPLETE',
    `the body ended after ${received} of the ${expected} bytes of its Content-Range; the bytes that arrived were kept, send the rest`,
    { received },
  );
}
