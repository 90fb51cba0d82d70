/**
 * Sending an export's disk bytes from their files straight to the socket
 * (sendfile(2), native/sendfile.c), where the stream path reads them into
 * buffers and writes those: two copies through user space for every byte,
 * which kept a whole-disk GET below nginx's sendfile (bench/README.md,
 * raw-throughput).
 *
 * Taken only where it gives the same bytes: a single range of an export
 * whose disk bytes lie in files as they are (SerializedImage.spans: a raw
 * file or a chain of them, in raw, vhd or qcow2, whole, ranged or a delta),
 * on a plain TCP socket (no TLS, which must encrypt in user space), with the
 * addon built; everything else streams as before. A vhd or qcow2 export's
 * own bytes (headers, tables, bitmaps, footers) go in the same native send,
 * in order between the file spans, from the buffers the layout made. The
 * sending runs on a thread of the addon's, so the event loop never waits on
 * the disk or the client; the socket's buffer is the backpressure, a client
 * gone or a cancelled task stops it, and the lease on the image (the old
 * generation's file, which a commit does not touch) is held until the thread
 * has let go of its descriptors.
 */
import type { ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import type { SendSpan } from '../formats/types.js';
import { addon, sendSpansTakesBuffers } from '../image/native.js';

/** Smaller bodies (the ranged GETs of qemu and backup agents) cost less through the stream path than a thread. */
export const ZERO_COPY_MIN_BYTES = 1024 * 1024;

/**
 * DISKPORT_SENDFILE=0 sends every body through the stream path (comparisons, a kernel whose sendfile
 * misbehaves); read per response, so a comparison can switch it without a restart.
 */
const enabled = () => process.env.DISKPORT_SENDFILE !== '0';

const EMPTY = Buffer.alloc(0);

/** Native sends started (each a thread): how many a body took, for tests and benchmarks. */
export const zeroCopyStats = { sends: 0 };

/** The response socket's descriptor when a zero-copy send can use it, else null. */
export function zeroCopySocketFd(res: ServerResponse): number | null {
  if (!enabled() || typeof addon?.sendSpans !== 'function') return null;
  const socket = res.socket as (Socket & { encrypted?: boolean; _handle?: { fd?: number } }) | null;
  if (!socket || socket.destroyed || socket.encrypted) return null;
  const fd = socket._handle?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : null;
}

export class ZeroCopyError extends Error {
  constructor(readonly code: string) {
    super(`sendfile failed: ${code}`);
  }
}

/** One native send's arguments: descriptors and buffers deduplicated, spans as triplets. */
interface NativeBatch {
  fds: number[];
  buffers: ArrayBuffer[];
  triplets: Float64Array | number[];
}

function nativeBatch(spans: readonly SendSpan[]): NativeBatch {
  const fds: number[] = [];
  const buffers: ArrayBuffer[] = [];
  const bufferIndex = new Map<ArrayBufferLike, number>();
  const triplets = new Float64Array(spans.length * 3);
  spans.forEach((s, i) => {
    if ('bytes' in s) {
      // Slices of one buffer (a VHD's bitmap before every block, Node's pooled slabs) pass it once.
      const ab = s.bytes.buffer;
      let index = bufferIndex.get(ab);
      if (index === undefined) {
        index = buffers.push(ab as ArrayBuffer) - 1;
        bufferIndex.set(ab, index);
      }
      triplets.set([-2 - index, s.bytes.byteOffset, s.bytes.length], 3 * i);
      return;
    }
    let index = -1;
    if (s.fd >= 0) {
      index = fds.indexOf(s.fd);
      if (index < 0) index = fds.push(s.fd) - 1;
    }
    triplets.set([index, s.position, s.length], 3 * i);
  });
  // An addon built before buffer spans takes only an array (and is never handed buffer spans: see export.ts).
  return { fds, buffers, triplets: sendSpansTakesBuffers ? triplets : Array.from(triplets) };
}

/**
 * Sends the batches of spans on the response's socket after everything
 * written so far (headers included), one native send per batch, the next
 * batch made while one is sent. Resolves once all bytes are in the socket;
 * rejects with `gone()` when the client went away, with the signal's reason
 * when it aborted, or with a ZeroCopyError.
 */
export async function sendSpans(
  res: ServerResponse,
  socketFd: number,
  batches: Iterable<readonly SendSpan[]>,
  onBytes: (n: number) => void,
  gone: () => Error,
  signal?: AbortSignal,
): Promise<void> {
  // The headers (and anything before) must be in the socket before the first byte from the file:
  // a write's callback runs once it and every earlier one were handed to the kernel.
  await new Promise<void>((resolve, reject) => {
    if (res.destroyed) return reject(gone());
    res.write(EMPTY, (err) => (err ? reject(gone()) : resolve()));
  });
  signal?.throwIfAborted();
  if (res.destroyed) throw gone();
  const it = batches[Symbol.iterator]();
  let next = it.next();
  while (!next.done) {
    const batch = nativeBatch(next.value);
    await sendBatch(res, socketFd, batch, onBytes, gone, signal, () => {
      next = it.next();
    });
  }
}

/** One native send; `meanwhile` runs once it has started (the next batch is made while this one goes). */
async function sendBatch(
  res: ServerResponse,
  socketFd: number,
  { fds, buffers, triplets }: NativeBatch,
  onBytes: (n: number) => void,
  gone: () => Error,
  signal: AbortSignal | undefined,
  meanwhile: () => void,
): Promise<void> {
  const native = addon!;
  signal?.throwIfAborted();
  if (res.destroyed) throw gone();
  zeroCopyStats.sends++;
  const socket = res.socket as Socket & { _unrefTimer?: () => void };
  let counted = 0;
  let cancelled: 'client' | 'signal' | { error: unknown } | null = null;
  let made: { error: unknown } | null = null;
  await new Promise<void>((resolve, reject) => {
    // Called from the addon: an exception here would be uncaught, so it ends the send instead.
    const count = (sent: number) => {
      try {
        if (sent > counted) onBytes(sent - counted);
        counted = sent;
        // Node sees none of these writes: keep its idle timer (if any) from calling the socket idle.
        socket._unrefTimer?.();
      } catch (error) {
        cancelled ??= { error };
        native.cancelSend(job);
      }
    };
    const job = native.sendSpans(
      socketFd,
      fds,
      triplets,
      count,
      (code, sent) => {
        count(sent);
        res.off('close', onClose);
        signal?.removeEventListener('abort', onAbort);
        if (typeof cancelled === 'object' && cancelled !== null) reject(cancelled.error);
        else if (made && code === null) reject(made.error);
        else if (code === null) resolve();
        else if (cancelled === 'signal') reject(signal?.reason);
        else if (cancelled === 'client' || code === 'EPIPE' || code === 'ECONNRESET') reject(gone());
        else reject(new ZeroCopyError(code));
      },
      ...(buffers.length > 0 ? [buffers] : []),
    );
    const onClose = () => {
      cancelled ??= 'client';
      native.cancelSend(job);
    };
    const onAbort = () => {
      cancelled ??= 'signal';
      native.cancelSend(job);
    };
    res.on('close', onClose);
    signal?.addEventListener('abort', onAbort);
    // Making the next batch fails only on a layout bug: this one still ends first (its lease, its fds).
    try {
      meanwhile();
    } catch (error) {
      made = { error };
    }
  });
}
