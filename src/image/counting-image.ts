/**
 * A disk whose reads are counted: how much of a VDI's content a commit read
 * (a delta import should read the delta's blocks, not the disk), reported
 * on /metrics. Extents are metadata and are not counted. Closing the count
 * closes the image.
 */
import { type BlockImage, type Extent, readByInto } from './block-image.js';

export class CountingImage implements BlockImage {
  readonly virtualSize: number;

  constructor(
    private readonly image: BlockImage,
    private readonly onBytes: (n: number) => void,
  ) {
    this.virtualSize = image.virtualSize;
  }

  read(offset: number, length: number): Promise<Buffer> {
    return readByInto(this, offset, length);
  }

  async readInto(buf: Buffer, offset: number): Promise<Buffer> {
    const got = await this.image.readInto(buf, offset);
    this.onBytes(got.length);
    return got;
  }

  extents(): Promise<Extent[]> {
    return this.image.extents();
  }

  close(): Promise<void> {
    return this.image.close();
  }
}
