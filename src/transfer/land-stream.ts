/**
 * Lands an incoming byte stream in a file at its offsets.
 *
 * The socket hands us 16-64 KiB pieces, and one syscall per MiB or more is
 * what lets an upload keep up with the wire: pieces are gathered, by the
 * caller's DirectWriter (aligned O_DIRECT writes) or route when it gives one,
 * else into WRITE_CHUNK_BYTES buffers here, the next filling while the
 * previous one is written. All-zero file-system blocks are skipped so they
 * stay holes. Backpressure is the async iterator's: we pull the next piece
 * only when at most one write is in flight.
 */
import type { promises as fsp } from 'node:fs';
import { ApiError } from '../errors.js';
import type { DirectWriter } from '../image/direct-writer.js';
import { writeFully } from '../image/file-io.js';
import { guarded, type SpaceGuard, spaceError } from '../image/space.js';
import { zeroRange } from '../image/sparse.js';
import { forEachRun } from '../image/zero.js';
import type { ByteRange } from './range-set.js';

export const WRITE_CHUNK_BYTES = 1024 * 1024;

export interface LandOptions {
  /** Where the first byte of the stream goes in the file. */
  offset: number;
  /** Largest number of bytes accepted; one more fails with `tooLarge()`. */
  limit: number;
  tooLarge: (received: number) => Error;
  onBytes?: (n: number) => void;
  /** Aborting ends the landing at once with the signal's reason, even while the client is silent. */
  signal?: AbortSignal;
  /**
   * What to do with all-zero blocks: 'skip' on a fresh file (they are holes
   * already), 'punch' where earlier bytes may lie (a resumed upload).
   */
  zeros?: 'skip' | 'punch';
  /** The parts of [start, end) to write; others are left as they are (bytes already received). Default: all. */
  writable?: (start: number, end: number) => ByteRange[];
  /** Sees every byte received, in order (e.g. to hash it). */
  onChunk?: (chunk: Buffer) => void;
  /**
   * Updated as writes complete: every byte of [offset, offset + written) is
   * in the file, or in `writer` (flush it first to count on them).
   */
  progress?: { written: number };
  /**
   * Gathers the file writes into aligned O_DIRECT writes (direct-writer.ts).
   * Its owner flushes it before it records what landed.
   */
  writer?: DirectWriter;
  /**
   * Keeps the SR's reserve for the writes made here without `writer` (a
   * DirectWriter keeps it itself): see image/space.ts.
   */
  space?: SpaceGuard | null;
  /**
   * Takes over each gathered write (a streaming import sends some bytes
   * elsewhere); `stage` is the ordinary write into the file.
   */
  route?: (
    buf: Buffer,
    length: number,
    at: number,
    stage: (b: Buffer, n: number, a: number) => Promise<void>,
  ) => Promise<void>;
}

/**
 * Iterates `body` but gives up as soon as `signal` aborts. The stream is left
 * undestroyed so the caller can still answer on the same connection.
 *
 * Each wait gets its own promise, rejected by the one abort listener. (Racing
 * every `it.next()` against one long-lived "aborted" promise leaks: that
 * promise never settles, so it keeps a reaction, and through it the chunk,
 * for every race: a whole upload ends up in memory.)
 */
async function* untilAborted(body: AsyncIterable<Buffer>, signal?: AbortSignal): AsyncGenerator<Buffer> {
  if (!signal) return yield* body;
  const it = body[Symbol.asyncIterator]();
  let rejectWait: ((reason: unknown) => void) | null = null;
  const onAbort = () => rejectWait?.(signal.reason);
  signal.addEventListener('abort', onAbort, { once: true });
  try {
    while (true) {
      signal.throwIfAborted();
      const next = await new Promise<IteratorResult<Buffer>>((resolve, reject) => {
        rejectWait = reject;
        it.next().then(resolve, reject);
      });
      rejectWait = null;
      if (next.done) return;
      yield next.value;
    }
  } finally {
    signal.removeEventListener('abort', onAbort);
  }
}

/** Where writeRuns puts its runs: a DirectWriter, or the file itself. */
type RunSink = Pick<DirectWriter, 'write' | 'zero'>;

function fileSink(handle: fsp.FileHandle, space: SpaceGuard | null | undefined): RunSink {
  return {
    write: (data, position) =>
      guarded(space, data.length, () => writeFully(handle, data, 0, data.length, position)),
    zero: (position, length) => zeroRange(handle, position, length),
  };
}

/** Writes buf[0, length) at file position `at`: data runs written, zero runs skipped or punched. */
function writeRuns(
  sink: RunSink,
  buf: Buffer,
  length: number,
  at: number,
  opts: Pick<LandOptions, 'zeros' | 'writable'>,
): Promise<unknown> {
  const writes: Promise<unknown>[] = [];
  forEachRun(buf, length, at, (s, e, zero) => {
    if (zero && opts.zeros !== 'punch') return;
    for (const [ws, we] of opts.writable ? opts.writable(at + s, at + e) : [[at + s, at + e]]) {
      writes.push(zero ? sink.zero(ws, we - ws) : sink.write(buf.subarray(ws - at, we - at), ws));
    }
  });
  // The usual small chunk: one run of data, or nothing left to write.
  if (writes.length <= 1) return writes[0] ?? Promise.resolve();
  return Promise.all(writes);
}

/** Writes buf[0, length) at file position `at` as landStream writes each of its buffers. */
export async function landBuffer(
  handle: fsp.FileHandle,
  buf: Buffer,
  length: number,
  at: number,
  opts: Pick<LandOptions, 'zeros' | 'writable' | 'space'>,
): Promise<void> {
  await writeRuns(fileSink(handle, opts.space), buf, length, at, opts);
}

/** Returns the number of bytes received. */
export async function landStream(
  body: AsyncIterable<Buffer>,
  handle: fsp.FileHandle,
  opts: LandOptions,
): Promise<number> {
  // A writer (or a route, streaming-import.ts) gathers the writes itself: each
  // piece goes on as it came, without a copy into our buffers (measured: 20-35 %
  // less CPU per 2 GiB upload).
  const passOn = opts.route !== undefined || opts.writer !== undefined;
  // Else two buffers, used in turn: one fills while the other is being written.
  // Reusing them (instead of a fresh 1 MiB buffer per write) keeps memory flat
  // and spares the allocator and the GC a page-faulting 1 MiB block per MiB.
  // A small body (a 64 KiB chunk) gets buffers of its size, not 2 MiB per request.
  const bufferBytes = passOn ? 0 : Math.min(WRITE_CHUNK_BYTES, Math.max(1, opts.limit));
  let spare = Buffer.allocUnsafe(bufferBytes);
  let buf = Buffer.allocUnsafe(bufferBytes);
  let fill = 0;
  let bufAt = opts.offset;
  let received = 0;
  let inFlight: Promise<void> = Promise.resolve();
  let writeError: unknown = null;

  const sink = opts.writer ?? fileSink(handle, opts.space);
  const stage = async (sb: Buffer, sn: number, sa: number) => {
    await writeRuns(sink, sb, sn, sa, opts);
  };
  /** Starts the write of b[0, n) at `at` once the one in flight is done. */
  const land = async (b: Buffer, n: number, at: number) => {
    await inFlight;
    if (writeError) throw writeError;
    inFlight = (opts.route ? opts.route(b, n, at, stage) : stage(b, n, at)).then(
      () => {
        if (opts.progress) opts.progress.written = at + n - opts.offset;
      },
      (err) => {
        writeError = spaceError(err, 'the upload');
      },
    );
  };
  const startWrite = async () => {
    const b = buf;
    await land(b, fill, bufAt);
    // `spare`'s write finished (awaited in land), so it can take the next bytes.
    [buf, spare] = [spare, b];
    bufAt += fill;
    fill = 0;
  };

  try {
    for await (const chunk of untilAborted(body, opts.signal)) {
      if (received + chunk.length > opts.limit) throw opts.tooLarge(received + chunk.length);
      received += chunk.length;
      opts.onChunk?.(chunk);
      if (passOn) {
        await land(chunk, chunk.length, bufAt);
        bufAt += chunk.length;
        opts.onBytes?.(chunk.length);
        continue;
      }
      let pos = 0;
      while (pos < chunk.length) {
        const n = chunk.copy(buf, fill, pos);
        fill += n;
        pos += n;
        if (fill === buf.length) await startWrite();
      }
      opts.onBytes?.(chunk.length);
    }
    if (fill > 0) await startWrite();
  } catch (err) {
    // A broken upload keeps what it delivered: land the partial buffer too,
    // so a resumable session can count every byte that arrived.
    if (opts.progress && fill > 0 && !writeError) await startWrite().catch(() => {});
    throw err;
  } finally {
    // Whatever happened, let the write in flight land so `progress` is true.
    await inFlight;
  }
  if (writeError) throw writeError;
  return received;
}

export function tooLargeForVdi(virtualSize: number) {
  return (received: number) =>
    new ApiError(
      'TOO_LARGE',
      `upload is larger than the VDI: ${received} bytes or more sent, VDI virtual size is ${virtualSize} bytes`,
      {
        received,
        virtual_size: virtualSize,
      },
    );
}
