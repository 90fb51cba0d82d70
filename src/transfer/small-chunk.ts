/**
 * A small chunk of an upload (a 64 KiB PUT of an imageio-style client, by
 * the thousand): read whole into one buffer, then written where it lands
 * with one positioned write. The general path (active-upload.ts) is built
 * for streams of gigabytes: a checkpoint timer, an abort signal joined from
 * two, an async generator per body and gathered writes. For a body that
 * arrives in a few socket reads that machinery cost more than the bytes.
 *
 * Taken only where nothing else is needed: a Content-Range inside the
 * declared length, no digest, a session that stages its bytes as they come
 * (no streaming conversion), and fewer bytes than one O_DIRECT write gathers.
 */
import type { Readable } from 'node:stream';
import { giveBack, takeBuffer } from '../image/buffer-pool.js';
import { DIRECT_BUFFER_BYTES } from '../image/direct-writer.js';
import type { ChunkRange, ChunkWrite } from './active-upload.js';
import type { WriteEnder } from './session-registry.js';
import type { Transfer } from './transfer-store.js';

/** The range of a chunk the small path takes, or undefined for the general path. */
export function smallChunkRange(t: Transfer, chunk: ChunkWrite): ChunkRange | undefined {
  const range = chunk.range;
  if (!range || chunk.digest || chunk.fresh || chunk.partial || t.size === null || !t.staging_path) return;
  if (range.total !== null && range.total !== t.size) return;
  if (range.end < range.start || range.end >= t.size || range.end - range.start + 1 >= DIRECT_BUFFER_BYTES)
    return;
  // A vhd or qcow2 upload may convert as it arrives (streaming-import.ts), which the VDI decides.
  if (t.format !== 'raw' && !t.checksum && !t.base) return;
  return range;
}

/**
 * What a small body delivered: `received` bytes of `buf`, and why it stopped
 * short, if it did. `buf` is from the buffer pool (it may be longer than
 * the body): give it back once nothing writes from it.
 */
export interface SmallBody {
  buf: Buffer;
  received: number;
  /** The body was longer than `expected`: how many bytes it had when that showed (else 0). */
  tooLong: number;
  /** The body failed (a connection broken), or a signal aborted the wait (its reason). */
  error: unknown;
}

/**
 * A small write's end from outside (endRedundantWrites), as an
 * AbortController's abort() without an EventTarget: ended once, with a
 * reason; a body's wait (readSmallBody) stops at once.
 */
export class WriteEnd implements WriteEnder {
  ended = false;
  reason: unknown;
  /** The wait to stop, while there is one. */
  onEnd: ((reason: unknown) => void) | null = null;

  end(reason: unknown): void {
    if (this.ended) return;
    this.ended = true;
    this.reason = reason;
    this.onEnd?.(reason);
  }
}

/**
 * Reads a body of at most `expected` bytes into one buffer. Stops at its end,
 * at a byte past `expected`, at an error, or when `ender` ends the write
 * (the session's task cancelled, or the write superseded); the stream is
 * left undestroyed so the caller can still answer on its connection.
 */
export function readSmallBody(body: Readable, expected: number, ender: WriteEnd): Promise<SmallBody> {
  const got: SmallBody = { buf: takeBuffer(expected), received: 0, tooLong: 0, error: null };
  if (body.readableEnded) return Promise.resolve(got);
  // Broken while the session's file opened: no event will come.
  if (body.destroyed) {
    got.error = new Error('the connection closed before the body ended');
    return Promise.resolve(got);
  }
  if (ender.ended) {
    got.error = ender.reason;
    return Promise.resolve(got);
  }
  return new Promise<SmallBody>((resolve) => {
    const done = () => {
      body.off('data', onData);
      body.off('end', done);
      body.off('error', onError);
      body.off('close', onClose);
      ender.onEnd = null;
      resolve(got);
    };
    const onData = (piece: Buffer) => {
      if (got.received + piece.length > expected) {
        got.tooLong = got.received + piece.length;
        body.pause();
        return done();
      }
      piece.copy(got.buf, got.received);
      got.received += piece.length;
    };
    const onError = (err: unknown) => {
      got.error = err;
      done();
    };
    // A connection that closes before the end: the bytes that came are what there is.
    const onClose = () => {
      if (!body.readableEnded) got.error ??= new Error('the connection closed before the body ended');
      done();
    };
    body.on('data', onData);
    body.on('end', done);
    body.on('error', onError);
    body.on('close', onClose);
    ender.onEnd = (reason) => {
      got.error = reason;
      body.pause();
      done();
    };
  });
}

/** Back to the pool once its bytes are written (never while a write may still read it). */
export function releaseSmallBody(got: SmallBody): void {
  giveBack(got.buf);
}
