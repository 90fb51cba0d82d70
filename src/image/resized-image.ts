import { type BlockImage, type Extent, mergeExtents, readByInto, readLength } from './block-image.js';
import { isZero } from './zero.js';

/**
 * A view of a disk at another virtual size: a larger view reads its tail as
 * zeros, a smaller one hides the inner disk's tail (callers check it is zero).
 * Read-only: it is how an image is imported into a VDI of another size.
 * Closing the view closes the inner disk.
 */
export class ResizedImage implements BlockImage {
  private closed = false;

  constructor(
    private readonly inner: BlockImage,
    readonly virtualSize: number,
  ) {}

  read(offset: number, length: number): Promise<Buffer> {
    return readByInto(this, offset, length);
  }

  async readInto(buf: Buffer, offset: number): Promise<Buffer> {
    const n = readLength(this.virtualSize, offset, buf.length);
    this.assertOpen();
    const inside = Math.max(0, Math.min(n, this.inner.virtualSize - offset));
    if (inside > 0) await this.inner.readInto(buf.subarray(0, inside), offset);
    return buf.fill(0, inside, n).subarray(0, n);
  }

  async extents(): Promise<Extent[]> {
    this.assertOpen();
    const clipped = (await this.inner.extents())
      .filter((e) => e.start < this.virtualSize)
      .map((e) => ({ ...e, length: Math.min(e.length, this.virtualSize - e.start) }));
    const tail = this.virtualSize - this.inner.virtualSize;
    return mergeExtents(
      tail > 0 ? [...clipped, { start: this.inner.virtualSize, length: tail, zero: true }] : clipped,
    );
  }

  async close(): Promise<void> {
    this.closed = true;
    await this.inner.close();
  }

  private assertOpen(): void {
    if (this.closed) throw new Error('resized image is closed');
  }
}

/** True when every byte of `image` at or past `offset` reads as zero (allocated or not). */
export async function isZeroFrom(image: BlockImage, offset: number): Promise<boolean> {
  const CHUNK_BYTES = 1024 * 1024;
  for (const e of await image.extents()) {
    const end = e.start + e.length;
    if (e.zero || end <= offset) continue;
    for (let pos = Math.max(offset, e.start); pos < end; pos += CHUNK_BYTES) {
      if (!isZero(await image.read(pos, Math.min(CHUNK_BYTES, end - pos)))) return false;
    }
  }
  return true;
}
