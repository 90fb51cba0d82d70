/**
 * A virtual disk in memory, sparse: a map of fixed-size blocks, and a block
 * never written (or zeroed whole) is a hole that reads as zeros. It reads and
 * writes like a raw file, so the logic above the seam (serializers, chains,
 * transfers) can be tested in microseconds, and the file-backed images are
 * tested for what is file-specific (ovirt-imageio's memory backend, the same
 * idea). Memory follows what is written, not the virtual size.
 */
import { checkWriteRange, type Extent, readByInto, readLength, type WritableImage } from './block-image.js';

export const MEMORY_BLOCK_BYTES = 64 * 1024;

export class MemoryImage implements WritableImage {
  /** Block index -> its bytes (blockBytes long; the last block may reach past virtualSize). */
  private readonly blocks = new Map<number, Buffer>();
  private closed = false;

  constructor(
    readonly virtualSize: number,
    readonly blockBytes = MEMORY_BLOCK_BYTES,
  ) {
    if (!Number.isSafeInteger(virtualSize) || virtualSize < 0) {
      throw new RangeError(`invalid virtual size ${virtualSize}`);
    }
    if (!Number.isSafeInteger(blockBytes) || blockBytes <= 0) {
      throw new RangeError(`invalid block size ${blockBytes}`);
    }
  }

  read(offset: number, length: number): Promise<Buffer> {
    return readByInto(this, offset, length);
  }

  async readInto(buf: Buffer, offset: number): Promise<Buffer> {
    const n = readLength(this.virtualSize, offset, buf.length);
    this.assertOpen();
    this.forEachPiece(offset, n, (b, inBlock, at, len) => {
      const block = this.blocks.get(b);
      if (block) block.copy(buf, at, inBlock, inBlock + len);
      else buf.fill(0, at, at + len);
    });
    return buf.subarray(0, n);
  }

  async write(offset: number, data: Buffer): Promise<void> {
    checkWriteRange(this.virtualSize, offset, data.length);
    this.assertOpen();
    // Copied in: the caller may reuse `data` as soon as this resolves.
    this.forEachPiece(offset, data.length, (b, inBlock, at, len) => {
      let block = this.blocks.get(b);
      if (!block) {
        block = Buffer.alloc(this.blockBytes);
        this.blocks.set(b, block);
      }
      data.copy(block, inBlock, at, at + len);
    });
  }

  /** Whole blocks become holes again; parts of blocks are filled with zeros. */
  async zero(offset: number, length: number): Promise<void> {
    checkWriteRange(this.virtualSize, offset, length);
    this.assertOpen();
    this.forEachPiece(offset, length, (b, inBlock, _at, len) => {
      const block = this.blocks.get(b);
      if (!block) return;
      // The last block may be cut short by the end of the disk: all of it inside counts as whole.
      const start = b * this.blockBytes;
      const wholeBlock = inBlock === 0 && len === Math.min(this.blockBytes, this.virtualSize - start);
      if (wholeBlock) this.blocks.delete(b);
      else block.fill(0, inBlock, inBlock + len);
    });
  }

  /** Memory is as durable as this image gets: a completed write is already visible to every read. */
  async flush(): Promise<void> {
    this.assertOpen();
  }

  async extents(): Promise<Extent[]> {
    this.assertOpen();
    const out: Extent[] = [];
    const add = (start: number, end: number, zero: boolean) => {
      if (end <= start) return;
      const last = out[out.length - 1];
      if (last && last.zero === zero) last.length += end - start;
      else out.push({ start, length: end - start, zero });
    };
    let pos = 0;
    for (const b of [...this.blocks.keys()].sort((x, y) => x - y)) {
      const start = b * this.blockBytes;
      add(pos, start, true);
      pos = Math.min(this.virtualSize, start + this.blockBytes);
      add(start, pos, false);
    }
    add(pos, this.virtualSize, true);
    return out;
  }

  async close(): Promise<void> {
    this.closed = true;
    this.blocks.clear();
  }

  /** Bytes of blocks held (what the image costs in memory). */
  get allocatedBytes(): number {
    return this.blocks.size * this.blockBytes;
  }

  /** Calls `fn(block, offsetInBlock, offsetInRange, length)` for each block-sized piece of the range. */
  private forEachPiece(
    offset: number,
    length: number,
    fn: (block: number, inBlock: number, at: number, len: number) => void,
  ): void {
    for (let pos = offset; pos < offset + length; ) {
      const b = Math.floor(pos / this.blockBytes);
      const inBlock = pos - b * this.blockBytes;
      const len = Math.min(this.blockBytes - inBlock, offset + length - pos);
      fn(b, inBlock, pos - offset, len);
      pos += len;
    }
  }

  private assertOpen(): void {
    if (this.closed) throw new Error('memory image is closed');
  }
}
