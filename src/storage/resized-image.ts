import { type BlockImage, type Extent, mergeExtents } from './block-image.js';

/** A view of a disk with a different (larger) virtual size: the tail reads as zeros. */
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
    const inner = await this.inner.extents();
    const tail = this.virtualSize - this.inner.virtualSize;
    return mergeExtents([...inner, { start: this.inner.virtualSize, length: tail, zero: true }]);
  }
  flush(): Promise<void> {
    return this.inner.flush();
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}
