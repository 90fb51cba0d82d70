import { type BlockImage, type Extent, mergeExtents } from './block-image.js';
import { isZero } from './zero.js';

/**
 * A view of a disk at another virtual size: a larger view reads its tail as
 * zeros, a smaller one hides the inner disk's tail (callers check it is zero).
 */
export class ResizedImage implements BlockImage {
  constructor(
    private readonly inner: BlockImage,
    readonly virtualSize: number,
  ) {}
  async read(offset: number, length: number): Promise<Buffer> {
    const n = Math.max(0, Math.min(length, this.virtualSize - offset));
    const inside = Math.max(0, Math.min(n, this.inner.virtualSize - offset));
    const head = inside > 0 ? await this.inner.read(offset, inside) : Buffer.alloc(0);
    return inside === n ? head : Buffer.concat([head, Buffer.alloc(n - inside)]);
  }
  write(): Promise<void> {
    throw new Error('ResizedImage is read-only');
  }
  async extents(): Promise<Extent[]> {
    const clipped = (await this.inner.extents())
      .filter((e) => e.start < this.virtualSize)
      .map((e) => ({ ...e, length: Math.min(e.length, this.virtualSize - e.start) }));
    const tail = this.virtualSize - this.inner.virtualSize;
    return mergeExtents(
      tail > 0 ? [...clipped, { start: this.inner.virtualSize, length: tail, zero: true }] : clipped,
    );
  }
  flush(): Promise<void> {
    return this.inner.flush();
  }
  close(): Promise<void> {
    return this.inner.close();
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
