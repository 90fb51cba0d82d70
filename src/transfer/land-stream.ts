/**
 * Lands an incoming byte stream in a file at its offsets.
 *
 * Bytes are gathered into WRITE_CHUNK_BYTES buffers before each pwrite (the
 * socket hands us 16-64 KiB pieces; one syscall per MiB is what lets an
 * upload keep up with the wire), the next buffer fills while the previous one
 * is being written, and all-zero file-system blocks are skipped so they stay
 * holes. Backpressure is the async iterator's: we pull the next piece only
 * when at most one write is in flight.
 */
import type { promises as fsp } from 'node:fs';
import { InsufficientSpaceError, TooLargeError } from '../errors.js';
import { forEachDataRun } from '../storage/zero.js';

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
}

/**
 * Iterates `body` but gives up as soon as `signal` aborts. The stream is left
 * undestroyed so the caller can still answer on the same connection.
 */
async function* untilAborted(body: AsyncIterable<Buffer>, signal?: AbortSignal): AsyncGenerator<Buffer> {
  if (!signal) return yield* body;
  const it = body[Symbol.asyncIterator]();
  let onAbort = () => {};
  const aborted = new Promise<never>((_, reject) => {
    onAbort = () => reject(signal.reason);
    signal.addEventListener('abort', onAbort, { once: true });
  });
  aborted.catch(() => {});
  try {
    signal.throwIfAborted();
    while (true) {
      const next = await Promise.race([it.next(), aborted]);
      if (next.done) return;
      yield next.value;
    }
  } finally {
    signal.removeEventListener('abort', onAbort);
  }
}

/** Writes the non-zero blocks of buf[0, length) at file position `at`. */
async function writeDataRuns(handle: fsp.FileHandle, buf: Buffer, length: number, at: number): Promise<void> {
  const writes: Promise<unknown>[] = [];
  forEachDataRun(buf, length, at, (s, e) => {
    writes.push(handle.write(buf, s, e - s, at + s));
  });
  try {
    await Promise.all(writes);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOSPC') {
      throw new InsufficientSpaceError(
        'the storage repository ran out of space while writing the upload; free space and retry',
      );
    }
    throw err;
  }
}

/** Returns the number of bytes received. */
export async function landStream(
  body: AsyncIterable<Buffer>,
  handle: fsp.FileHandle,
  opts: LandOptions,
): Promise<number> {
  let buf = Buffer.allocUnsafe(WRITE_CHUNK_BYTES);
  let fill = 0;
  let bufAt = opts.offset;
  let received = 0;
  let inFlight: Promise<void> = Promise.resolve();
  let writeError: unknown = null;

  const startWrite = async () => {
    await inFlight;
    if (writeError) throw writeError;
    const [b, n, at] = [buf, fill, bufAt];
    inFlight = writeDataRuns(handle, b, n, at).catch((err) => {
      writeError = err;
    });
    buf = Buffer.allocUnsafe(WRITE_CHUNK_BYTES);
    bufAt += n;
    fill = 0;
  };

  for await (const chunk of untilAborted(body, opts.signal)) {
    if (received + chunk.length > opts.limit) throw opts.tooLarge(received + chunk.length);
    received += chunk.length;
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
  await inFlight;
  if (writeError) throw writeError;
  return received;
}

export function tooLargeForVdi(virtualSize: number) {
  return (received: number) =>
    new TooLargeError(
      `upload is larger than the VDI: ${received} bytes or more sent, VDI virtual size is ${virtualSize} bytes`,
      {
        received,
        virtual_size: virtualSize,
      },
    );
}
