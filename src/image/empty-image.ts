/** A disk that is all zeros: the content of a new VDI, serialized into its format at rest. */
import type { BlockImage, Extent } from './block-image.js';

export class EmptyImage implements BlockImage {
  constructor(readonly virtualSize: number) {}
  async read(offset: number, length: number): Promise<Buffer> {
    return Buffer.alloc(Math.max(0, Math.min(length, this.virtualSize - offset)));
  }
  async write(): Promise<void> {
    throw new Error('EmptyImage is read-only');
  }
  async extents(): Promise<Extent[]> {
    return this.virtualSize > 0 ? [{ start: 0, length: this.virtualSize, zero: true }] : [];
  }
  async flush(): Promise<void> {}
  async close(): Promise<void> {}
}
