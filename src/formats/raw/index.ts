/**
 * raw: the bytes of the virtual disk, nothing else. Holes are produced from a
 * shared zero buffer, never read from storage.
 */
import type { BlockImage, Extent } from '../../storage/block-image.js';
import { RawFileImage } from '../../storage/raw-file-image.js';
import { zeroBuffer } from '../../storage/zero.js';
import type { FormatCodec, SerializedImage } from '../types.js';

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
      const n = Math.min(chunkBytes, stop - pos);
      yield { offset: pos, length: n, zero: e.zero };
      pos += n;
    }
    i++;
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
 */
export async function* readVirtual(
  image: BlockImage,
  extents: readonly Extent[],
  start: number,
  end: number,
  chunkBytes = READ_CHUNK_BYTES,
): AsyncGenerator<Buffer> {
  const pieces = piecesOf(extents, start, end, chunkBytes);
  const begin = (p: Piece): Promise<Buffer> | null => (p.zero ? null : image.read(p.offset, p.length));
  let current = pieces.next();
  let reading = current.done ? null : begin(current.value);
  try {
    while (!current.done) {
      const piece = current.value;
      const next = pieces.next();
      const nextReading = next.done ? null : begin(next.value);
      const buf = reading
        ? await reading.catch((err) => {
            nextReading?.catch(() => {}); // nobody will await it: no unhandled rejection
            throw err;
          })
        : zeroBuffer(piece.length);
      current = next;
      reading = nextReading;
      yield buf;
    }
  } finally {
    // Abandoned early (a client gone, a range served): the read ahead is nobody's.
    reading?.catch(() => {});
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

export const rawCodec: FormatCodec = {
  name: 'raw',
  async serialize(image: BlockImage): Promise<SerializedImage> {
    const extents = await image.extents();
    return {
      size: image.virtualSize,
      read: (start, end) => readVirtual(image, extents, start, end),
    };
  },
  open(path, opts) {
    return RawFileImage.open(path, { writable: opts?.writable });
  },
};
