/**
 * Reading a virtual disk's bytes by its extents, one read ahead, for every
 * consumer that streams a whole range: serializers, checksums, conversions,
 * pushes. Holes come from a shared zero buffer, never from storage.
 */
import type { BlockImage, Extent } from './block-image.js';
import { zeroBuffer } from './zero.js';

/** Large reads: fewer syscalls and event-loop turns than fs streams' 64 KiB. */
export const READ_CHUNK_BYTES = 2 * 1024 * 1024;

/** A piece of [start, end): `length` bytes at `offset`, all in one extent. */
interface Piece {
  offset: number;
  length: number;
  zero: boolean;
}

function* piecesOf(
  extents: readonly Extent[],
  start: number,
  end: number,
  chunkBytes: number,
): Generator<Piece> {
  let i = findExtent(extents, start);
  let pos = start;
  while (pos < end && i < extents.length) {
    const e = extents[i];
    const stop = Math.min(end, e.start + e.length);
    while (pos < stop) {
      // Cut at multiples of chunkBytes, so a serializer reading with its block
      // size as chunkBytes never gets a piece spanning two blocks.
      const n = Math.min(chunkBytes - (pos % chunkBytes), stop - pos);
      yield { offset: pos, length: n, zero: e.zero };
      pos += n;
    }
    i++;
  }
}

/** Spare buffers a readVirtual keeps for reuse, at most. */
const MAX_SPARE_BUFFERS = 4;

/**
 * The buffers readVirtual reuses (see there). A serializer that reads block
 * by block, one readVirtual per block, passes the same ReadBuffers to every
 * call, so a buffer handed back during one block serves the next: otherwise
 * each block would allocate afresh.
 */
export class ReadBuffers {
  readonly spare: Buffer[] = [];
  /** A yielded view -> the buffer it lies in. */
  readonly wholeOf = new WeakMap<Buffer, Buffer>();

  /**
   * Takes back a buffer the consumer is done with, if one of ours. A
   * serializer passes on what its own yields receive (the consumer hands
   * buffers back with whatever `next()` comes), or they would be lost.
   */
  giveBack(view: Buffer | undefined): void {
    const whole = view && this.wholeOf.get(view);
    if (!whole) return;
    this.wholeOf.delete(view);
    if (this.spare.length < MAX_SPARE_BUFFERS) this.spare.push(whole);
  }
}

/**
 * Yields the virtual-disk bytes of [start, end) given the image's extents:
 * zero extents from memory, data extents read in READ_CHUNK_BYTES pieces.
 * Shared by every serializer for the data part of its layout.
 *
 * One read ahead: the next data piece is being read while the consumer sends
 * or writes the one just yielded, so the storage and the consumer overlap
 * instead of taking turns. At most two pieces are held at once.
 *
 * Buffers can be handed back: a consumer done with a yielded buffer (say,
 * its socket has flushed it) may pass it as the argument of a later `next()`,
 * and a later piece is read into it (the image's readInto) instead of into
 * a new buffer. Only buffers this call yielded are taken back, each once, and
 * `for await` passes nothing, so consumers that keep their chunks are safe.
 * Without it an export allocates its whole size in fresh buffers, and V8
 * answers that churn of external memory with back-to-back full GCs.
 */
export async function* readVirtual(
  image: BlockImage,
  extents: readonly Extent[],
  start: number,
  end: number,
  chunkBytes = READ_CHUNK_BYTES,
  buffers = new ReadBuffers(),
): AsyncGenerator<Buffer, void, Buffer | undefined> {
  const pieces = piecesOf(extents, start, end, chunkBytes);
  const { wholeOf, spare } = buffers;
  const startRead = (p: Piece): Promise<Buffer> => {
    let whole = spare.pop();
    if (!whole || whole.length < p.length) whole = Buffer.allocUnsafe(p.length);
    const into = whole;
    return image.readInto(into.subarray(0, p.length), p.offset).then((view) => {
      wholeOf.set(view, into);
      return view;
    });
  };
  const begin = (p: Piece): Promise<Buffer> | null => {
    if (p.zero) return null;
    const read = startRead(p);
    // A read ahead may fail while we are suspended at a yield (a slow client,
    // a corrupt cluster) or be abandoned (a client gone, a range served, an
    // earlier read failed): marked as handled now, it still rejects where it
    // is awaited, and is never an unhandled rejection that ends the process.
    read.catch(() => {});
    return read;
  };
  let current = pieces.next();
  let reading = current.done ? null : begin(current.value);
  while (!current.done) {
    const piece = current.value;
    const next = pieces.next();
    const nextReading = next.done ? null : begin(next.value);
    const buf = reading ? await reading : zeroBuffer(piece.length);
    current = next;
    reading = nextReading;
    buffers.giveBack(yield buf);
  }
}

/** Index of the extent containing `offset` (binary search; extents are ordered and contiguous). */
export function findExtent(extents: readonly Extent[], offset: number): number {
  let lo = 0;
  let hi = extents.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (extents[mid].start <= offset) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}
