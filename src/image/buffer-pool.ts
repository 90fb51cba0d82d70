/**
 * Spare buffers for the small requests that come by the thousand a second
 * (64 KiB ranged GETs, 64 KiB chunk PUTs). A fresh 64 KiB buffer per request
 * is external memory V8 answers with full GCs: at 5,000 chunk PUTs a second,
 * 40-90 collections every 2 s, pauses up to 9 ms, the whole p99 (measured
 * with monitorEventLoopDelay). A buffer is given back only once nothing
 * (a write in flight, a socket) holds it any more.
 */
const MIN_POOLED_BYTES = 64 * 1024;
/** Larger buffers are allocated and left to the GC. */
const MAX_POOLED_BYTES = 4 * 1024 * 1024;
const SPARE_PER_SIZE = 8;

/** Spare buffers by size (powers of two from 64 KiB). */
const spare = new Map<number, Buffer[]>();

function pooledSize(length: number): number {
  let size = MIN_POOLED_BYTES;
  while (size < length) size *= 2;
  return size;
}

/** A buffer of at least `length` bytes, its contents whatever they were (allocUnsafe). */
export function takeBuffer(length: number): Buffer {
  if (length > MAX_POOLED_BYTES) return Buffer.allocUnsafe(length);
  const size = pooledSize(length);
  return spare.get(size)?.pop() ?? Buffer.allocUnsafe(size);
}

/** Gives back a buffer takeBuffer gave, once nothing reads or writes it. */
export function giveBack(buf: Buffer): void {
  if (buf.length > MAX_POOLED_BYTES || buf.length !== pooledSize(buf.length)) return;
  const list = spare.get(buf.length);
  if (!list) spare.set(buf.length, [buf]);
  else if (list.length < SPARE_PER_SIZE) list.push(buf);
}
