/**
 * A virtual disk stored as a sparse raw file: byte N of the disk is byte N of
 * the file, holes are file-system holes (found with SEEK_DATA/SEEK_HOLE).
 *
 * Two classes, as the two sides of the interface: RawFileImage reads a file
 * opened read-only (an export, a staged upload); WritableRawFileImage opens
 * it for writing too and so also writes, zeroes and flushes.
 */
import { constants as fsConstants, promises as fsp } from 'node:fs';
import {
  type BlockImage,
  checkWriteRange,
  type Extent,
  type FileSpan,
  type ImageWriter,
  readByInto,
  readLength,
} from './block-image.js';
import { PRIVATE_FILE_MODE, readAt, writeFully } from './file-io.js';
import { fileExtents, zeroRange } from './sparse.js';

export class RawFileImage implements BlockImage {
  private closed = false;

  protected constructor(
    protected readonly handle: fsp.FileHandle,
    readonly virtualSize: number,
    readonly path: string,
  ) {}

  /** Opens an existing raw file read-only; its size is the virtual size unless one is given. */
  static async open(path: string, opts: { virtualSize?: number } = {}): Promise<RawFileImage> {
    const handle = await fsp.open(path, fsConstants.O_RDONLY);
    return new RawFileImage(handle, await sizeOf(handle, opts.virtualSize), path);
  }

  read(offset: number, length: number): Promise<Buffer> {
    return readByInto(this, offset, length);
  }

  /** Past the end of a short file, zeros (as a staged upload reads where nothing was written). */
  async readInto(buf: Buffer, offset: number): Promise<Buffer> {
    const n = readLength(this.virtualSize, offset, buf.length);
    this.assertOpen();
    return readAt(this.handle, buf.subarray(0, n), offset);
  }

  /** Byte N of the disk is byte N of the file (past a short file's end, zeros: sendfile's caller sends them). */
  fileSpans(offset: number, length: number): FileSpan[] {
    const n = readLength(this.virtualSize, offset, length);
    this.assertOpen();
    return n > 0 ? [{ fd: this.handle.fd, position: offset, length: n }] : [];
  }

  async extents(): Promise<Extent[]> {
    this.assertOpen();
    return fileExtents(this.handle.fd, this.virtualSize);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    // Waits for reads still running on the handle (FileHandle.close does).
    await this.handle.close();
  }

  /** Bytes really allocated on disk. */
  async allocatedBytes(): Promise<number> {
    this.assertOpen();
    const st = await this.handle.stat();
    return st.blocks * 512;
  }

  protected assertOpen(): void {
    if (this.closed) throw new Error(`raw image ${this.path} is closed`);
  }
}

export class WritableRawFileImage extends RawFileImage implements ImageWriter {
  /** Opens an existing raw file for reading and writing; its size is the virtual size unless one is given. */
  static async openWritable(
    path: string,
    opts: { virtualSize?: number } = {},
  ): Promise<WritableRawFileImage> {
    const handle = await fsp.open(path, fsConstants.O_RDWR);
    return new WritableRawFileImage(handle, await sizeOf(handle, opts.virtualSize), path);
  }

  /** Creates (or truncates) a sparse file of `virtualSize` bytes: all hole. */
  static async create(path: string, virtualSize: number): Promise<WritableRawFileImage> {
    const handle = await fsp.open(path, 'w+', PRIVATE_FILE_MODE);
    try {
      await handle.truncate(virtualSize);
    } catch (err) {
      await handle.close();
      throw err;
    }
    return new WritableRawFileImage(handle, virtualSize, path);
  }

  async write(offset: number, data: Buffer): Promise<void> {
    checkWriteRange(this.virtualSize, offset, data.length);
    this.assertOpen();
    await writeFully(this.handle, data, 0, data.length, offset);
  }

  /** Whole file-system blocks become holes; the partial blocks at either end are written with zeros. */
  async zero(offset: number, length: number): Promise<void> {
    checkWriteRange(this.virtualSize, offset, length);
    this.assertOpen();
    await zeroRange(this.handle, offset, length);
  }

  async flush(): Promise<void> {
    this.assertOpen();
    await this.handle.sync();
  }
}

async function sizeOf(handle: fsp.FileHandle, given: number | undefined): Promise<number> {
  try {
    return given ?? (await handle.stat()).size;
  } catch (err) {
    await handle.close();
    throw err;
  }
}
