/**
 * Opening a VHD file as a random-access BlockImage, read side only: VHD at
 * rest is written whole by serialize, never patched in place.
 *
 * Implements, from Microsoft's "Virtual Hard Disk Image Format Specification":
 * "Hard Disk Footer Format" (where the footer is, its checksum, disk type and
 * size), "Dynamic Disk Header Format" (cookie, checksum, table offset, block
 * size), "Block Allocation Table and Data Blocks" (BAT entries as sector
 * offsets, 0xFFFFFFFF for unallocated blocks; the sector bitmap, where a
 * clear bit means the sector was never written and reads as zeros) and
 * "Mapping a Disk Sector to a Sector in the Block".
 *
 * Hand-written (see format.ts): every field of an uploaded image is hostile.
 * Each one is checked against the file's real size before it is used, and
 * nothing is allocated in proportion to a number the file merely claims: the
 * BAT is read only once it is known to lie inside the file, so memory stays
 * bounded by the file's size.
 */
import { promises as fsp } from 'node:fs';
import { formatBytes, MalformedImageError, UnsupportedImageError } from '../../errors.js';
import {
  type BlockImage,
  type ByteSpan,
  type Extent,
  readByInto,
  readLength,
} from '../../image/block-image.js';
import type { DefinedRange } from '../../image/chain-image.js';
import { fileExtents } from '../../image/sparse.js';
import type { DifferencingImage, OpenOptions } from '../types.js';
import {
  BAT_UNALLOCATED,
  bitmapBytesOnDisk,
  DISK_TYPE_DIFFERENCING,
  DISK_TYPE_DYNAMIC,
  DISK_TYPE_FIXED,
  FOOTER_BYTES,
  FOOTER_COOKIE,
  type Footer,
  footerVirtualSize,
  HEADER_BYTES,
  HEADER_COOKIE,
  MAX_VIRTUAL_SIZE_BYTES,
  parentUuidOf,
  parseDynamicHeader,
  parseFooter,
  SECTOR_BYTES,
} from './format.js';

const FORMAT = 'vhd';

/** Partially-set sector bitmaps kept in memory; fully set or clear ones cost one byte each. */
const BITMAP_CACHE_ENTRIES = 256;
/** Sector bitmaps read at once while computing extents. */
const BITMAP_READ_CONCURRENCY = 32;

/** What is known of a block's sector bitmap. */
export const BitmapState = {
  Unknown: 0,
  /** Every sector of the block (within the virtual size) is present. */
  Full: 1,
  /** No sector is present: the block reads as zeros. */
  Empty: 2,
  Partial: 3,
} as const;
type Summary = typeof BitmapState.Full | typeof BitmapState.Empty;

function malformed(message: string, details?: Record<string, unknown>): MalformedImageError {
  return new MalformedImageError(FORMAT, message, details);
}

/** Reads exactly `length` bytes at `position` into buf[offset..], or says the file is too short. */
async function readFully(
  handle: fsp.FileHandle,
  buf: Buffer,
  offset: number,
  length: number,
  position: number,
  what: string,
): Promise<void> {
  let done = 0;
  while (done < length) {
    const { bytesRead } = await handle.read(buf, offset + done, length - done, position + done);
    if (bytesRead === 0) {
      throw malformed(
        `file ends at byte ${position + done} while reading ${what} (${length} bytes at ${position})`,
      );
    }
    done += bytesRead;
  }
}

async function readAt(
  handle: fsp.FileHandle,
  position: number,
  length: number,
  what: string,
): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  await readFully(handle, buf, 0, length, position, what);
  return buf;
}

/** A 64-bit offset from the file as a number, or null when it cannot be a position in any real file. */
function safeOffset(value: bigint): number | null {
  return value <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(value) : null;
}

function checkRange(what: string, start: number | null, length: number, limit: number): number {
  if (start === null || start + length > limit) {
    throw malformed(
      `${what} (${length} bytes at offset ${start ?? 'beyond 2^53'}) lies outside the ${limit} bytes of the file before the footer`,
    );
  }
  return start;
}

function overlaps(aStart: number, aLength: number, bStart: number, bLength: number): boolean {
  return aStart < bStart + bLength && bStart < aStart + aLength;
}

interface FooterChoice {
  footer: Footer;
  /** Bytes of the file available to data: everything before the trailing footer, if there is one. */
  limit: number;
}

/**
 * Finds the footer. The spec's authoritative copy is the last 512 bytes; a
 * dynamic disk also keeps a copy at offset 0. qemu reads offset 0 first and so
 * opens dynamic disks whose trailing footer was lost; we prefer the trailing
 * one (a fixed disk whose data happens to start with "conectix" stays fixed)
 * and fall back to the copy at 0 only for dynamic and differencing disks.
 */
async function chooseFooter(handle: fsp.FileHandle, fileSize: number): Promise<FooterChoice> {
  if (fileSize < FOOTER_BYTES) {
    throw malformed(`file of ${fileSize} bytes is too small to hold the ${FOOTER_BYTES}-byte VHD footer`);
  }
  const tail = parseFooter(await readAt(handle, fileSize - FOOTER_BYTES, FOOTER_BYTES, 'the footer'));
  const head = parseFooter(await readAt(handle, 0, FOOTER_BYTES, 'the footer copy'));
  const tailCookie = tail.cookie === FOOTER_COOKIE;
  const headCookie = head.cookie === FOOTER_COOKIE;
  const headUsable =
    headCookie &&
    head.checksum === head.computedChecksum &&
    (head.diskType === DISK_TYPE_DYNAMIC || head.diskType === DISK_TYPE_DIFFERENCING);
  const limit = tailCookie ? fileSize - FOOTER_BYTES : fileSize;
  if (tailCookie && tail.checksum === tail.computedChecksum) return { footer: tail, limit };
  if (headUsable) return { footer: head, limit };
  const bad = tailCookie ? tail : headCookie ? head : null;
  if (!bad) {
    throw malformed(
      `no footer: cookie '${FOOTER_COOKIE}' found neither in the last ${FOOTER_BYTES} bytes nor at offset 0`,
    );
  }
  if (bad.checksum !== bad.computedChecksum) {
    throw malformed(
      `footer checksum is 0x${hex(bad.checksum)} but its bytes sum to 0x${hex(bad.computedChecksum)} (corrupt or truncated image)`,
    );
  }
  // A valid footer copy at 0 of a fixed disk: fixed disks have no such copy.
  throw malformed('the footer at offset 0 describes a fixed disk, whose footer must be the last 512 bytes');
}

function hex(n: number): string {
  return n.toString(16).padStart(8, '0');
}

/**
 * Opens a fixed or dynamic VHD read-only, and with `opts.differencing` a
 * differencing one (a DifferencingImage: its sectors present in the
 * bitmaps are its own, the rest its parent's). Throws MalformedImageError /
 * UnsupportedImageError.
 */
export async function openVhd(path: string, opts: OpenOptions = {}): Promise<BlockImage> {
  const handle = await fsp.open(path, 'r');
  try {
    const fileSize = (await handle.stat()).size;
    const { footer, limit } = await chooseFooter(handle, fileSize);
    const differencing = footer.diskType === DISK_TYPE_DIFFERENCING;
    if (differencing && !opts.differencing) {
      throw new UnsupportedImageError(
        FORMAT,
        'differencing VHD: its content depends on a parent image that is not part of the upload; ' +
          'merge it into a standalone image first (e.g. qemu-img convert -O vpc child.vhd whole.vhd)',
        { disk_type: footer.diskType },
      );
    }
    if (footer.diskType !== DISK_TYPE_FIXED && footer.diskType !== DISK_TYPE_DYNAMIC && !differencing) {
      throw malformed(`disk type ${footer.diskType} is neither fixed (2) nor dynamic (3)`, {
        disk_type: footer.diskType,
      });
    }
    const size = footerVirtualSize(footer);
    if (size > BigInt(MAX_VIRTUAL_SIZE_BYTES)) {
      throw new UnsupportedImageError(
        FORMAT,
        `virtual size ${size} bytes exceeds the VHD limit of ${formatBytes(MAX_VIRTUAL_SIZE_BYTES)}`,
        { virtual_size: size.toString() },
      );
    }
    const virtualSize = Number(size);
    if (footer.diskType === DISK_TYPE_FIXED) {
      if (virtualSize > limit) {
        throw malformed(
          `fixed disk of ${virtualSize} bytes needs ${virtualSize + FOOTER_BYTES} bytes of file but has ${fileSize} (truncated?)`,
        );
      }
      return new FixedVhdImage(handle, virtualSize);
    }
    const image = await DynamicVhdImage.load(handle, footer, virtualSize, limit);
    return differencing ? new DifferencingVhdImage(image) : image;
  } catch (err) {
    await handle.close();
    throw err;
  }
}

abstract class VhdImageBase implements BlockImage {
  private closed = false;

  constructor(
    protected readonly handle: fsp.FileHandle,
    readonly virtualSize: number,
  ) {}

  /** Fills out (already cut at virtualSize) with the disk's bytes from `offset`. */
  protected abstract fill(out: Buffer, offset: number): Promise<void>;
  protected abstract allocation(): Promise<Extent[]>;

  read(offset: number, length: number): Promise<Buffer> {
    return readByInto(this, offset, length);
  }

  async readInto(buf: Buffer, offset: number): Promise<Buffer> {
    const out = buf.subarray(0, readLength(this.virtualSize, offset, buf.length));
    this.assertOpen();
    await this.fill(out, offset);
    return out;
  }

  async extents(): Promise<Extent[]> {
    this.assertOpen();
    return this.allocation();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.handle.close();
  }

  /** A dynamic disk serves unallocated blocks without the handle: closed must be checked here. */
  private assertOpen(): void {
    if (this.closed) throw new Error('VHD image is closed');
  }
}

/** "Fixed hard disk image": the disk's bytes, then the footer. */
class FixedVhdImage extends VhdImageBase {
  protected async fill(out: Buffer, offset: number): Promise<void> {
    await readFully(this.handle, out, 0, out.length, offset, 'disk data');
  }

  protected async allocation(): Promise<Extent[]> {
    // Holes in the file are holes in the disk.
    return fileExtents(this.handle.fd, this.virtualSize);
  }
}

/** "Dynamic hard disk image": footer copy, header, BAT, blocks (bitmap + data), footer. */
class DynamicVhdImage extends VhdImageBase {
  private readonly bitmapState: Uint8Array;
  /** Partial bitmaps, least recently used first (Map keeps insertion order). */
  private readonly bitmapCache = new Map<number, Buffer>();
  private readonly sectorsPerBlock: number;
  /** Bytes of each bitmap that matter: one bit per sector of the block. */
  private readonly bitmapUsedBytes: number;
  private readonly bitmapDiskBytes: number;

  private constructor(
    handle: fsp.FileHandle,
    virtualSize: number,
    private readonly bat: Uint32Array,
    private readonly blockSizeBytes: number,
    /** The parent's unique id in the header (meaningful for a differencing disk only). */
    readonly parentUuid: string,
  ) {
    super(handle, virtualSize);
    this.bitmapState = new Uint8Array(bat.length);
    this.sectorsPerBlock = blockSizeBytes / SECTOR_BYTES;
    this.bitmapUsedBytes = Math.ceil(this.sectorsPerBlock / 8);
    this.bitmapDiskBytes = bitmapBytesOnDisk(blockSizeBytes);
  }

  static async load(
    handle: fsp.FileHandle,
    footer: Footer,
    virtualSize: number,
    limit: number,
  ): Promise<DynamicVhdImage> {
    const headerOffset = checkRange(
      'dynamic disk header',
      safeOffset(footer.dataOffset),
      HEADER_BYTES,
      limit,
    );
    if (headerOffset < FOOTER_BYTES) {
      throw malformed(`dynamic disk header offset ${headerOffset} overlaps the footer copy at offset 0`);
    }
    const headerBytes = await readAt(handle, headerOffset, HEADER_BYTES, 'the dynamic disk header');
    const header = parseDynamicHeader(headerBytes);
    if (header.cookie !== HEADER_COOKIE) {
      throw malformed(
        `dynamic disk header at offset ${headerOffset} has cookie ${JSON.stringify(header.cookie)} instead of '${HEADER_COOKIE}'`,
      );
    }
    if (header.checksum !== header.computedChecksum) {
      throw malformed(
        `dynamic disk header checksum is 0x${hex(header.checksum)} but its bytes sum to 0x${hex(header.computedChecksum)}`,
      );
    }
    const blockSize = header.blockSizeBytes;
    // qemu accepts any power of two from one sector up; so do we.
    if (blockSize < SECTOR_BYTES || (blockSize & (blockSize - 1)) !== 0) {
      throw malformed(`block size ${blockSize} is not a power of two of at least ${SECTOR_BYTES} bytes`);
    }
    const entries = header.maxTableEntries;
    if (entries * blockSize < virtualSize) {
      throw malformed(
        `the BAT's ${entries} entries of ${formatBytes(blockSize)} map ${entries * blockSize} bytes, less than the virtual size ${virtualSize}`,
      );
    }
    const batBytes = entries * 4;
    // Checked before allocating: a claimed 4-billion-entry BAT must really be in the file.
    const tableOffset = checkRange('block allocation table', safeOffset(header.tableOffset), batBytes, limit);
    if (
      overlaps(tableOffset, batBytes, 0, FOOTER_BYTES) ||
      overlaps(tableOffset, batBytes, headerOffset, HEADER_BYTES)
    ) {
      throw malformed(
        `block allocation table at offset ${tableOffset} overlaps the footer copy or the header`,
      );
    }
    const raw = await readAt(handle, tableOffset, batBytes, 'the block allocation table');
    const bat = new Uint32Array(entries);
    for (let i = 0; i < entries; i++) bat[i] = raw.readUInt32BE(i * 4);
    validateBlocks(bat, blockSize, limit, [
      [0, FOOTER_BYTES],
      [headerOffset, HEADER_BYTES],
      [tableOffset, batBytes],
    ]);
    return new DynamicVhdImage(handle, virtualSize, bat, blockSize, parentUuidOf(headerBytes));
  }

  /** Bytes of block `b` inside the virtual disk (the last block may be cut short). */
  private blockLength(b: number): number {
    return Math.min(this.blockSizeBytes, this.virtualSize - b * this.blockSizeBytes);
  }

  private dataOffset(b: number): number {
    return this.bat[b] * SECTOR_BYTES + this.bitmapDiskBytes;
  }

  /** The block's sector bitmap, or its summary when every relevant bit is the same. */
  private async bitmap(b: number): Promise<Buffer | Summary> {
    const state = this.bitmapState[b];
    if (state === BitmapState.Full || state === BitmapState.Empty) return state;
    const cached = this.bitmapCache.get(b);
    if (cached) {
      this.bitmapCache.delete(b);
      this.bitmapCache.set(b, cached);
      return cached;
    }
    const bits = await readAt(
      this.handle,
      this.bat[b] * SECTOR_BYTES,
      this.bitmapUsedBytes,
      `the sector bitmap of block ${b}`,
    );
    const summary = classifyBitmap(bits, Math.ceil(this.blockLength(b) / SECTOR_BYTES));
    if (summary !== BitmapState.Partial) {
      this.bitmapState[b] = summary;
      return summary;
    }
    this.bitmapState[b] = BitmapState.Partial;
    this.bitmapCache.set(b, bits);
    if (this.bitmapCache.size > BITMAP_CACHE_ENTRIES) {
      this.bitmapCache.delete(this.bitmapCache.keys().next().value as number);
    }
    return bits;
  }

  protected async fill(out: Buffer, offset: number): Promise<void> {
    // Not zero-filled up front: a fully present block is read over in full,
    // and every other piece is zeroed below before (or instead of) reading.
    let pos = offset;
    const end = offset + out.length;
    while (pos < end) {
      const b = Math.floor(pos / this.blockSizeBytes);
      const inBlock = pos - b * this.blockSizeBytes;
      const len = Math.min(this.blockSizeBytes - inBlock, end - pos);
      const bits = this.bat[b] === BAT_UNALLOCATED ? BitmapState.Empty : await this.bitmap(b);
      if (bits === BitmapState.Full) {
        await readFully(this.handle, out, pos - offset, len, this.dataOffset(b) + inBlock, `block ${b}`);
      } else {
        out.fill(0, pos - offset, pos - offset + len);
        if (bits !== BitmapState.Empty) {
          const base = this.dataOffset(b);
          // Only sectors whose bit is set are read; the rest stay zero.
          const first = Math.floor(inBlock / SECTOR_BYTES);
          const last = Math.ceil((inBlock + len) / SECTOR_BYTES);
          for (const [s0, s1] of setRuns(bits, first, last)) {
            const from = Math.max(s0 * SECTOR_BYTES, inBlock);
            const to = Math.min(s1 * SECTOR_BYTES, inBlock + len);
            await readFully(
              this.handle,
              out,
              pos - offset + (from - inBlock),
              to - from,
              base + from,
              `block ${b}`,
            );
          }
        }
      }
      pos += len;
    }
  }

  /**
   * The sectors present, exactly (a differencing disk's own sectors: a clear
   * bit reads through to the parent), as merged ranges. Bounded by the file:
   * each allocated block lies in it, and adds at most one range per two sectors.
   */
  async definedRanges(): Promise<DefinedRange[]> {
    const out: DefinedRange[] = [];
    const add = (start: number, length: number): void => {
      const last = out[out.length - 1];
      if (last && last.start + last.length === start) last.length += length;
      else out.push({ start, length });
    };
    const blocks = Math.ceil(this.virtualSize / this.blockSizeBytes);
    for (let b = 0; b < blocks; b++) {
      if (this.bat[b] === BAT_UNALLOCATED) continue;
      const start = b * this.blockSizeBytes;
      const length = this.blockLength(b);
      const bits = await this.bitmap(b);
      if (bits === BitmapState.Empty) continue;
      if (bits === BitmapState.Full) {
        add(start, length);
        continue;
      }
      for (const [s0, s1] of setRuns(bits, 0, Math.ceil(length / SECTOR_BYTES))) {
        const from = start + s0 * SECTOR_BYTES;
        add(from, Math.min(start + s1 * SECTOR_BYTES, start + length) - from);
      }
    }
    return out;
  }

  protected async allocation(): Promise<Extent[]> {
    const blocks = Math.ceil(this.virtualSize / this.blockSizeBytes);
    // Load bitmaps a few at a time: the first call on a big disk reads thousands.
    const pending: number[] = [];
    for (let b = 0; b < blocks; b++) {
      if (this.bat[b] !== BAT_UNALLOCATED && this.bitmapState[b] === BitmapState.Unknown) pending.push(b);
    }
    for (let i = 0; i < pending.length; i += BITMAP_READ_CONCURRENCY) {
      await Promise.all(pending.slice(i, i + BITMAP_READ_CONCURRENCY).map((b) => this.bitmap(b)));
    }
    // Merged as they are made: a 2 TiB disk has a million blocks, mostly unallocated.
    const out: Extent[] = [];
    const add = (start: number, length: number, zero: boolean): void => {
      const last = out[out.length - 1];
      if (last && last.zero === zero && last.start + last.length === start) last.length += length;
      else out.push({ start, length, zero });
    };
    for (let b = 0; b < blocks; b++) {
      const start = b * this.blockSizeBytes;
      const length = this.blockLength(b);
      const state = this.bitmapState[b];
      if (this.bat[b] === BAT_UNALLOCATED || state === BitmapState.Empty) {
        add(start, length, true);
        continue;
      }
      if (state === BitmapState.Full) {
        add(start, length, false);
        continue;
      }
      const bits = await this.bitmap(b);
      if (bits === BitmapState.Full || bits === BitmapState.Empty) {
        add(start, length, bits === BitmapState.Empty);
        continue;
      }
      // One extent per run of bitmap bytes (8 sectors, 4 KiB): a data extent
      // may hold a few never-written sectors, which read as zeros anyway, and
      // a hostile bitmap cannot turn into one extent per sector.
      const sectors = Math.ceil(length / SECTOR_BYTES);
      for (let byte = 0; byte * 8 < sectors; byte++) {
        const s0 = byte * 8;
        const s1 = Math.min(s0 + 8, sectors);
        const mask = (0xff << (8 - (s1 - s0))) & 0xff;
        const from = start + s0 * SECTOR_BYTES;
        const to = Math.min(start + s1 * SECTOR_BYTES, start + length);
        add(from, to - from, (bits[byte] & mask) === 0);
      }
    }
    return out;
  }

  /** A dynamic disk has no zero flag: what reads as zeros is what no block or sector bitmap allocates. */
  async unallocated(): Promise<ByteSpan[]> {
    return (await this.extents()).filter((e) => e.zero).map(({ start, length }) => ({ start, length }));
  }
}

/**
 * "Differencing Hard Disk Image": laid out as a dynamic disk, whose present
 * sectors are its own and whose other sectors are its parent's (named by
 * the header's parent unique id).
 */
class DifferencingVhdImage implements DifferencingImage {
  readonly parent: { uuid: string };

  constructor(private readonly image: DynamicVhdImage) {
    this.parent = { uuid: image.parentUuid };
  }

  get virtualSize(): number {
    return this.image.virtualSize;
  }

  read(offset: number, length: number): Promise<Buffer> {
    return this.image.read(offset, length);
  }

  readInto(buf: Buffer, offset: number): Promise<Buffer> {
    return this.image.readInto(buf, offset);
  }

  extents(): Promise<Extent[]> {
    return this.image.extents();
  }

  defined(): Promise<DefinedRange[]> {
    return this.image.definedRanges();
  }

  close(): Promise<void> {
    return this.image.close();
  }
}

/**
 * Every allocated block (bitmap + data) must lie inside the file before the
 * footer, clear of the metadata, and clear of every other block: two BAT
 * entries sharing storage would make writes to one disk region show up in
 * another, and a block past the end means the image was truncated.
 */
function validateBlocks(
  bat: Uint32Array,
  blockSizeBytes: number,
  limit: number,
  reserved: ReadonlyArray<readonly [number, number]>,
): void {
  const strideBytes = bitmapBytesOnDisk(blockSizeBytes) + blockSizeBytes;
  let allocated = 0;
  for (let i = 0; i < bat.length; i++) if (bat[i] !== BAT_UNALLOCATED) allocated++;
  const starts = new Uint32Array(allocated);
  let k = 0;
  for (let i = 0; i < bat.length; i++) {
    const entry = bat[i];
    if (entry === BAT_UNALLOCATED) continue;
    const start = entry * SECTOR_BYTES;
    if (start + strideBytes > limit) {
      throw malformed(
        `BAT entry ${i} puts its block (${strideBytes} bytes with bitmap) at offset ${start}, past the ${limit} bytes of the file before the footer (truncated image?)`,
        { bat_index: i },
      );
    }
    for (const [rStart, rLength] of reserved) {
      if (overlaps(start, strideBytes, rStart, rLength)) {
        throw malformed(
          `BAT entry ${i} puts its block at offset ${start}, over the VHD metadata at offset ${rStart}`,
          {
            bat_index: i,
          },
        );
      }
    }
    starts[k++] = entry;
  }
  starts.sort();
  for (let j = 1; j < starts.length; j++) {
    if ((starts[j] - starts[j - 1]) * SECTOR_BYTES < strideBytes) {
      throw malformed(
        `two BAT entries put blocks at offsets ${starts[j - 1] * SECTOR_BYTES} and ${starts[j] * SECTOR_BYTES}, which overlap (blocks take ${strideBytes} bytes)`,
      );
    }
  }
}

/**
 * Sector `s` is present when its bit is set. Sector 0 is the most significant
 * bit of byte 0, as Virtual PC, Hyper-V and Xen's libvhd store it.
 */
function bitSet(bits: Buffer, s: number): boolean {
  return (bits[s >> 3] & (0x80 >> (s & 7))) !== 0;
}

/** Whether the first `sectors` bits are all set, all clear, or mixed; whole bytes at a time. */
export function classifyBitmap(bits: Buffer, sectors: number): Summary | typeof BitmapState.Partial {
  let anySet = false;
  let anyClear = false;
  const wholeBytes = sectors >> 3;
  for (let i = 0; i < wholeBytes; i++) {
    const byte = bits[i];
    if (byte !== 0) anySet = true;
    if (byte !== 0xff) anyClear = true;
    if (anySet && anyClear) return BitmapState.Partial;
  }
  for (let s = wholeBytes << 3; s < sectors; s++) {
    if (bitSet(bits, s)) anySet = true;
    else anyClear = true;
  }
  if (anySet && anyClear) return BitmapState.Partial;
  return anyClear ? BitmapState.Empty : BitmapState.Full;
}

/** Runs [s0, s1) of set bits within sectors [first, last). */
function* setRuns(bits: Buffer, first: number, last: number): Generator<[number, number]> {
  let s = first;
  while (s < last) {
    while (s < last && !bitSet(bits, s)) s++;
    const s0 = s;
    while (s < last && bitSet(bits, s)) s++;
    if (s > s0) yield [s0, s];
  }
}
