/**
 * A virtual disk stored as a sparse raw file: byte N of the disk is byte N of
 * the file, holes are file-system holes (found with SEEK_DATA/SEEK_HOLE).
 */
import { constants as fsConstants, promises as fsp } from 'node:fs';
import type { BlockImage, Extent } from './block-image.js';
import { fileExtents } from './sparse.js';

export class RawFileImage implements BlockImage {
  private constructor(
    private readonly handle: fsp.FileHandle,
    public readonly virtualSize: number,
    readonly path: string,
  ) {}

  /** Opens an existing raw file; its size is the virtual size unless one is given. */
  static async open(
    path: string,
    opts: { writable?: boolean; virtualSize?: number } = {},
  ): Promise<RawFileImage> {
    const handle = await fsp.open(path, opts.writable ? fsConstants.O_RDWR : fsConstants.O_RDONLY);
    const size = opts.virtualSize ?? (await handle.stat()).size;
    return new RawFileImage(handle, size, path);
  }

  /** Creates (or truncates) a sparse file of `virtualSize` bytes: all hole. */
  static async create(path: string, virtualSize: number): Promise<RawFileImage> {
    const handle = await fsp.open(path, 'w+');
    await handle.truncate(virtualSize);
    return new RawFileImage(handle, virtualSize, path);
  }

  get fd(): number {
    return this.handle.fd;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const n = Math.max(0, Math.min(length, this.virtualSize - offset));
    const buf = Buffer.allocUnsafe(n);
    let done = 0;
    while (done < n) {
      const { bytesRead } = await this.handle.read(buf, done, n - done, offset + done);
      if (bytesRead === 0) {
        buf.fill(0, done); // past the end of a short file: zeros
        break;
      }
      done += bytesRead;
    }
    return buf;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    if (offset + data.length > this.virtualSize) {
      throw new RangeError(
        `write of ${data.length} bytes at ${offset} past virtual size ${this.virtualSize}`,
      );
    }
    let done = 0;
    while (done < data.length) {
      const { bytesWritten } = await this.handle.write(data, done, data.length - done, offset + done);
      done += bytesWritten;
    }
  }

  async extents(): Promise<Extent[]> {
    return fileExtents(this.handle.fd, this.virtualSize);
  }

  async flush(): Promise<void> {
    await this.handle.sync();
  }

  async close(): Promise<void> {
    await this.handle.close();
  }

  /** Bytes really allocated on disk. */
  async allocatedBytes(): Promise<number> {
    const st = await this.handle.stat();
    return st.blocks * 512;
  }
}
