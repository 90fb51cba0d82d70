/**
 * The VHD layout learned as an image streams in (see ../stream-layout.ts).
 *
 * It reads what openVhd reads, in file order: the footer copy at offset 0,
 * the dynamic disk header, the BAT, then each allocated block's sector bitmap,
 * which sits just before the block's data. A block whose bitmap is full is
 * announced as one data piece; any other block is left to open().
 *
 * A fixed disk has no footer copy at 0: it is its own data. When sector 0
 * holds no footer cookie and the file's size is known up front, everything
 * between that sector (staged, since it had to be read to tell) and the
 * trailing footer is announced as is.
 *
 * open() trusts the trailing footer over the copy at 0, and the pieces were
 * announced from the copy, so `verifyEnd()` checks that both agree. For the
 * same reason the file's size must be known up front: its last sector, which
 * may be that footer, is never announced as data.
 */
import { MalformedImageError } from '../../errors.js';
import { affordable, type HostRange, StreamLayout } from '../stream-layout.js';
import {
  BAT_UNALLOCATED,
  bitmapBytesOnDisk,
  DISK_TYPE_DYNAMIC,
  DISK_TYPE_FIXED,
  FOOTER_BYTES,
  FOOTER_COOKIE,
  type Footer,
  footerVirtualSize,
  HEADER_BYTES,
  HEADER_COOKIE,
  parseDynamicHeader,
  parseFooter,
  SECTOR_BYTES,
} from './format.js';
import { BitmapState, classifyBitmap } from './image.js';

type Step = 'footer' | 'header' | 'bat' | 'bitmaps' | 'done';

function validFooter(f: Footer): boolean {
  return f.cookie === FOOTER_COOKIE && f.checksum === f.computedChecksum;
}

export class VhdStreamLayout extends StreamLayout {
  private step: Step = 'footer';
  /** The footer copy at 0 of a dynamic disk. */
  private head: Footer | null = null;
  /** Decided at the first sector: a fixed disk was announced whole. */
  private fixed = false;
  private virtualSize = 0;
  private needRange: HostRange | null = [0, FOOTER_BYTES];
  private blockSize = 0;
  private entries = 0;
  /** Allocated blocks in file order: sector offsets and block numbers. */
  private blockSectors = new Uint32Array(0);
  private blockNumbers = new Uint32Array(0);
  private cursor = 0;

  /** `fileSize`: the upload's length when known before its bytes (Content-Length, a declared size). */
  constructor(private readonly fileSize: number | null) {
    super();
  }

  protected nextNeed(): HostRange | null {
    if (this.step !== 'bitmaps') return this.needRange;
    if (this.cursor >= this.blockSectors.length) return null;
    const start = this.blockSectors[this.cursor] * SECTOR_BYTES;
    return [start, start + Math.ceil(this.blockSize / SECTOR_BYTES / 8)];
  }

  protected learnNeed(bytes: Buffer): void {
    switch (this.step) {
      case 'footer': {
        this.learnFooter(parseFooter(bytes));
        return;
      }
      case 'header': {
        this.learnHeader(bytes);
        return;
      }
      case 'bat': {
        this.learnBat(bytes);
        return;
      }
      case 'bitmaps': {
        this.learnBitmap(bytes);
        return;
      }
      default:
        return;
    }
  }

  private finish(): void {
    this.step = 'done';
    this.needRange = null;
  }

  private learnFooter(footer: Footer): void {
    if (validFooter(footer) && footer.diskType === DISK_TYPE_DYNAMIC) {
      // Without the file's size, its last sector is not known: it might be
      // the trailing footer that open() prefers, and must then be staged.
      if (this.fileSize === null) {
        this.disable();
        return;
      }
      this.head = footer;
      this.virtualSize = Number(footerVirtualSize(footer));
      const headerOffset = Number(footer.dataOffset);
      this.needRange = headerOffset >= FOOTER_BYTES ? affordable(headerOffset, HEADER_BYTES) : null;
      this.step = 'header';
      if (!this.needRange) this.disable();
      return;
    }
    this.finish();
    // A damaged or odd footer copy: leave the disk to open(), which may trust the trailing footer.
    if (footer.cookie === FOOTER_COOKIE) return;
    if (this.fileSize !== null && this.fileSize > 2 * FOOTER_BYTES) {
      // A fixed disk: sector 0 was staged to read it; the rest is the disk itself.
      this.fixed = true;
      this.announce(SECTOR_BYTES, SECTOR_BYTES, this.fileSize - FOOTER_BYTES - SECTOR_BYTES);
    }
  }

  private learnHeader(bytes: Buffer): void {
    const header = parseDynamicHeader(bytes);
    const blockSize = header.blockSizeBytes;
    if (
      header.cookie !== HEADER_COOKIE ||
      header.checksum !== header.computedChecksum ||
      blockSize < SECTOR_BYTES ||
      (blockSize & (blockSize - 1)) !== 0 ||
      header.maxTableEntries * blockSize < this.virtualSize
    ) {
      this.disable();
      return;
    }
    this.blockSize = blockSize;
    this.entries = header.maxTableEntries;
    this.needRange = affordable(Number(header.tableOffset), this.entries * 4);
    this.step = 'bat';
    if (!this.needRange) this.disable();
  }

  private learnBat(bytes: Buffer): void {
    const blocks = Math.min(this.entries, Math.ceil(this.virtualSize / this.blockSize));
    const allocated: number[] = [];
    for (let b = 0; b < blocks; b++) if (bytes.readUInt32BE(b * 4) !== BAT_UNALLOCATED) allocated.push(b);
    allocated.sort((a, b) => bytes.readUInt32BE(a * 4) - bytes.readUInt32BE(b * 4));
    this.blockNumbers = Uint32Array.from(allocated);
    this.blockSectors = this.blockNumbers.map((b) => bytes.readUInt32BE(b * 4));
    const strideSectors = (bitmapBytesOnDisk(this.blockSize) + this.blockSize) / SECTOR_BYTES;
    for (let k = 1; k < this.blockSectors.length; k++) {
      // Overlapping blocks: open() refuses the image; announce nothing more.
      if (this.blockSectors[k] - this.blockSectors[k - 1] < strideSectors) {
        this.disable();
        return;
      }
    }
    this.step = 'bitmaps';
  }

  private learnBitmap(bits: Buffer): void {
    const b = this.blockNumbers[this.cursor];
    const sector = this.blockSectors[this.cursor];
    this.cursor++;
    const guest = b * this.blockSize;
    const length = Math.min(this.blockSize, this.virtualSize - guest);
    if (classifyBitmap(bits, Math.ceil(length / SECTOR_BYTES)) !== BitmapState.Full) return;
    const host = sector * SECTOR_BYTES + bitmapBytesOnDisk(this.blockSize);
    // The file's last sector stays staged: open() reads it as the footer if it is one.
    const beforeFooter = (this.fileSize as number) - FOOTER_BYTES;
    this.announce(host, guest, Math.min(length, beforeFooter - host));
  }

  /**
   * Given the complete file's last sector: throws when open() would read
   * the disk otherwise than the pieces announced here.
   */
  override verifyEnd(lastSector: Buffer, placed: boolean): void {
    if (!placed || !this.announcedAny) return; // nothing was placed by the copy at 0: open() decides alone
    const tail = parseFooter(lastSector);
    if (!validFooter(tail)) return; // open() falls back to the copy at 0, or fails by itself
    if (this.fixed) {
      if (tail.diskType !== DISK_TYPE_FIXED) {
        throw new MalformedImageError(
          'vhd',
          'the trailing footer describes a dynamic disk, but the file does not start with the copy of it that a dynamic disk must have',
        );
      }
      return;
    }
    if (!this.head) return;
    if (
      tail.diskType !== this.head.diskType ||
      tail.dataOffset !== this.head.dataOffset ||
      footerVirtualSize(tail) !== footerVirtualSize(this.head)
    ) {
      throw new MalformedImageError(
        'vhd',
        'the footer at the end of the file and its copy at offset 0 disagree (disk type, header offset or size); the image is corrupt',
      );
    }
  }
}
