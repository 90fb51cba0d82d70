/**
 * The one seam between transfers and storage: a random-access virtual disk.
 *
 * What is read and what is written are two interfaces. Every image reads
 * (`BlockImage`): exports serialize from one, checksums and conversions read
 * one, and every format at rest (raw file, VHD, qcow2) opens as one. Only
 * images that can really change also take writes (`ImageWriter`): a raw file
 * and the in-memory image today, the layers of a snapshot chain next. An
 * image that cannot write has no write method at all, so a caller cannot
 * reach one by mistake. `extents()` is what makes everything sparse-aware:
 * callers never read a region reported as zero.
 */
export interface Extent {
  /** Byte offset in the virtual disk. */
  start: number;
  length: number;
  /** True when the region reads as zeros and has no storage behind it. */
  zero: boolean;
}

/** A range of the virtual disk. */
export interface ByteSpan {
  start: number;
  length: number;
}

/**
 * Where some bytes of a disk lie in a file, as they are (a raw file, a raw
 * layer): `length` bytes at `position` of descriptor `fd`; fd -1 stands for
 * zeros. What a zero-copy send (sendfile) needs instead of the bytes.
 */
export interface FileSpan {
  fd: number;
  position: number;
  length: number;
}

/** The read side of a virtual disk. */
export interface BlockImage {
  /** Size of the virtual disk in bytes. */
  readonly virtualSize: number;
  /** Reads `length` bytes at `offset`; holes read as zeros. Never past virtualSize. */
  read(offset: number, length: number): Promise<Buffer>;
  /**
   * read(), into the caller's buffer: fills `buf` from `offset`, cut at
   * virtualSize, and returns the part filled (a view of `buf` from its
   * first byte). Every byte of that part is written, holes with zeros, so a
   * buffer can be reused from read to read.
   */
  readInto(buf: Buffer, offset: number): Promise<Buffer>;
  /** Merged, ordered, covering [0, virtualSize) exactly once. */
  extents(): Promise<Extent[]>;
  /**
   * Only where the format has the notion (qcow2 clusters, dynamic VHD
   * blocks): the ranges it leaves unallocated, which read as zeros here and
   * would read through to a backing file if there were one (imageio's
   * `hole`). A zero cluster is allocated; a raw file's holes are not
   * reported (qemu and imageio never call them holes either). Ordered.
   */
  unallocated?(): Promise<ByteSpan[]>;
  /**
   * Only where the disk's bytes lie in files as they are (raw files and
   * chains of them): the file spans that read as [offset, offset + length),
   * in order, cut at virtualSize; valid while the image is open. Absent
   * where bytes must be decoded (a container at rest, a memory image).
   */
  fileSpans?(offset: number, length: number): FileSpan[];
  /** Releases the image; later reads (and writes) reject. Closing twice is harmless. */
  close(): Promise<void>;
}

/** The write side of a virtual disk. Writes never change its size. */
export interface ImageWriter {
  /** Writes `data` at `offset`; the range must lie inside the disk (RangeError otherwise). */
  write(offset: number, data: Buffer): Promise<void>;
  /** Makes [offset, offset + length) read as zeros, freeing its storage where it can. */
  zero(offset: number, length: number): Promise<void>;
  /** Makes every completed write and zero durable. */
  flush(): Promise<void>;
}

/** An image that is read and written: a raw file opened for writing, a memory image. */
export type WritableImage = BlockImage & ImageWriter;

/**
 * How many bytes a read of `length` at `offset` returns: cut at the end of
 * the disk, none past it. A negative or fractional offset or length is a
 * caller's mistake, refused with a RangeError before any storage is touched.
 */
export function readLength(virtualSize: number, offset: number, length: number): number {
  if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
    throw new RangeError(`invalid read of ${length} bytes at ${offset}`);
  }
  return Math.max(0, Math.min(length, virtualSize - offset));
}

/** Refuses (RangeError) a write or zero of `length` bytes at `offset` that does not lie inside the disk. */
export function checkWriteRange(virtualSize: number, offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
    throw new RangeError(`invalid write of ${length} bytes at ${offset}`);
  }
  if (offset + length > virtualSize) {
    throw new RangeError(`write of ${length} bytes at ${offset} past virtual size ${virtualSize}`);
  }
}

/** read() in terms of readInto(): what every implementation's read() is. */
export async function readByInto(image: BlockImage, offset: number, length: number): Promise<Buffer> {
  return image.readInto(Buffer.allocUnsafe(readLength(image.virtualSize, offset, length)), offset);
}

/** Merges adjacent extents of the same kind and drops empty ones. */
export function mergeExtents(extents: Iterable<Extent>): Extent[] {
  const out: Extent[] = [];
  for (const e of extents) {
    if (e.length <= 0) continue;
    const last = out[out.length - 1];
    if (last && last.zero === e.zero && last.start + last.length === e.start) {
      last.length += e.length;
    } else {
      out.push({ ...e });
    }
  }
  return out;
}

/** Bytes of data (non-zero extents) in an extent list. */
export function allocatedBytes(extents: readonly Extent[]): number {
  let n = 0;
  for (const e of extents) if (!e.zero) n += e.length;
  return n;
}
