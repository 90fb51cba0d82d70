/** A disk that is all zeros: the content of a new VDI, serialized into its format at rest. */
import { type BlockImage, type Extent, readByInto, readLength } from './block-image.js';

export class EmptyImage implements BlockImage {
  private closed = false;

  constructor(readonly virtualSize: number) {}

  read(offset: number, length: number): Promise<Buffer> {
    return readByInto(this, offset, length);
  }

  async readInto(buf: Buffer, offset: number): Promise<Buffer> {
    const n = readLength(this.virtualSize, offset, buf.length);
    this.assertOpen();
    return buf.fill(0, 0, n).subarray(0, n);
  }

  async extents(): Promise<Extent[]> {
    this.assertOpen();
    return this.virtualSize > 0 ? [{ start: 0, length: this.virtualSize, zero: true }] : [];
  }

  async close(): Promise<void> {
    this.closed = true;
  }

  private assertOpen(): void {
    if (this.closed) throw new Error('empty image is closed');
  }
}
