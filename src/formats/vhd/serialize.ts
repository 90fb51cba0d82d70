/**
 * Export as a dynamic VHD, laid out up front so the size is exact and any
 * byte range is produced without producing the bytes before it.
 *
 * Implements, from Microsoft's "Virtual Hard Disk Image Format Specification":
 * "Hard Disk Footer Format" (written twice: a copy at offset 0 and the footer
 * at the end), "Dynamic Disk Header Format", "Block Allocation Table and Data
 * Blocks" (the BAT and each block's sector bitmap) and "Appendix: CHS
 * Calculation". Hand-written (see format.ts): no maintained npm
 * library writes VHD, let alone as a seekable, range-addressable stream.
 *
 * Layout (every offset a multiple of 512):
 *
 *   0                  footer copy (512)
 *   512                dynamic disk header (1024)
 *   1536               BAT: one entry per 2 MiB of disk, padded with 0xFF to a sector
 *   (differencing only) two parent locator sectors: W2ru then W2ku, `.\{parent}` in UTF-16LE
 *   dataStart          block 0 of the emitted blocks: bitmap (512, all ones) + 2 MiB of data
 *   dataStart + k*S    block k, S = 512 + 2 MiB; only blocks overlapping data extents, in disk order
 *   end - 512          footer
 *
 * Size: qemu sizes an image by CHS geometry unless its creator application is
 * one that trusts "Current Size" (block/vpc.c). We write creator 'win ' (what
 * Hyper-V writes; qemu, Hyper-V, Azure, VirtualBox and XenServer all read it
 * by Current Size) with the spec's geometry, so every virtual size that is a
 * whole number of sectors comes out exact, CHS-representable or not.
 *
 * Deterministic: the timestamp is 0 (2000-01-01T00:00:00Z) and the unique id
 * is a hash of the virtual size and the BAT, so two exports of the same
 * content and allocation are byte-identical (a strong ETag holds) while
 * different disks still get different ids.
 */
import { createHash } from 'node:crypto';
import { formatBytes, UnsupportedImageError } from '../../errors.js';
import type { BlockImage, Extent } from '../../image/block-image.js';
import { ReadBuffers, readVirtual } from '../../image/read-virtual.js';
import { zeroBuffer } from '../../image/zero.js';
import { formatSpans } from '../send-spans.js';
import type { SerializedImage, SerializeOptions, StreamPiece } from '../types.js';
import {
  bitmapBytesOnDisk,
  buildDynamicHeader,
  buildFooter,
  DISK_TYPE_DIFFERENCING,
  DISK_TYPE_DYNAMIC,
  FOOTER_BYTES,
  HEADER_BYTES,
  LOCATOR_W2KU,
  LOCATOR_W2RU,
  MAX_VIRTUAL_SIZE_BYTES,
  SECTOR_BYTES,
  setParent,
} from './format.js';

export const EXPORT_BLOCK_SIZE_BYTES = 2 * 1024 * 1024;
const BITMAP_BYTES = bitmapBytesOnDisk(EXPORT_BLOCK_SIZE_BYTES);
export const BLOCK_STRIDE_BYTES = BITMAP_BYTES + EXPORT_BLOCK_SIZE_BYTES;
/** Every sector of an emitted block is marked present: the block's bytes are the disk's bytes, zeros included. */
export const BITMAP_ALL_SET = Buffer.alloc(BITMAP_BYTES, 0xff);
const HEADER_OFFSET = FOOTER_BYTES;
const BAT_OFFSET = HEADER_OFFSET + HEADER_BYTES;
/** Hyper-V's creator application: tells qemu to size the image by Current Size, not CHS. */
const CREATOR_APP = 'win ';
const CREATOR_OS = 'Wi2k';
const UUID_NAMESPACE = 'diskport vhd export v1';

/** Indices of the blocks that overlap a data extent, ascending. */
function dataBlocks(extents: readonly Extent[]): number[] {
  const blocks: number[] = [];
  for (const e of extents) {
    if (e.zero || e.length <= 0) continue;
    const first = Math.floor(e.start / EXPORT_BLOCK_SIZE_BYTES);
    const last = Math.floor((e.start + e.length - 1) / EXPORT_BLOCK_SIZE_BYTES);
    for (let b = first; b <= last; b++) {
      if (blocks.length === 0 || blocks[blocks.length - 1] < b) blocks.push(b);
    }
  }
  return blocks;
}

export interface VhdLayout {
  virtualSize: number;
  /** Emitted blocks' indices in the disk, in file order (= disk order). */
  blocks: number[];
  dataStart: number;
  size: number;
  /** Footer copy + header + BAT: everything before the first block. */
  head: Buffer;
  footer: Buffer;
}

/**
 * With `opts.parent`, a differencing disk (type 4): its blocks are the
 * disk's bytes where `extents` say data (whole 2 MiB blocks, every sector
 * bit set), and everything else reads through to the parent.
 */
export function layoutVhd(
  virtualSize: number,
  extents: readonly Extent[],
  opts: SerializeOptions = {},
): VhdLayout {
  if (!Number.isSafeInteger(virtualSize) || virtualSize < 0 || virtualSize % SECTOR_BYTES !== 0) {
    throw new UnsupportedImageError(
      'vhd',
      `virtual size ${virtualSize} bytes is not a whole number of ${SECTOR_BYTES}-byte sectors, which VHD requires; resize the disk first`,
      { virtual_size: virtualSize },
    );
  }
  if (virtualSize > MAX_VIRTUAL_SIZE_BYTES) {
    throw new UnsupportedImageError(
      'vhd',
      `virtual size ${formatBytes(virtualSize)} exceeds the VHD limit of ${formatBytes(MAX_VIRTUAL_SIZE_BYTES)}; export as qcow2 or raw`,
      { virtual_size: virtualSize },
    );
  }
  const entries = Math.ceil(virtualSize / EXPORT_BLOCK_SIZE_BYTES);
  const batBytes = Math.ceil((entries * 4) / SECTOR_BYTES) * SECTOR_BYTES;
  const locatorStart = BAT_OFFSET + batBytes;
  const parent = opts.parent;
  const dataStart = locatorStart + (parent ? 2 * SECTOR_BYTES : 0);
  const blocks = dataBlocks(extents);
  const size = dataStart + blocks.length * BLOCK_STRIDE_BYTES + FOOTER_BYTES;

  const head = Buffer.alloc(dataStart, 0xff);
  head.fill(0, locatorStart);
  blocks.forEach((b, k) => {
    head.writeUInt32BE((dataStart + k * BLOCK_STRIDE_BYTES) / SECTOR_BYTES, BAT_OFFSET + b * 4);
  });
  const bat = head.subarray(BAT_OFFSET, locatorStart);
  const hash = createHash('sha256').update(UUID_NAMESPACE).update(String(virtualSize)).update(bat);
  if (parent) hash.update(parent.fileName).update(parent.uuid ?? Buffer.alloc(0));
  const uuid = opts.uuid ? Buffer.from(opts.uuid) : hash.digest();
  if (!opts.uuid) {
    // RFC 9562 version 8 (vendor-specific) with the RFC variant, so tools that parse it see a well-formed UUID.
    uuid[6] = (uuid[6] & 0x0f) | 0x80;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
  }
  const footer = buildFooter({
    virtualSizeBytes: virtualSize,
    diskType: parent ? DISK_TYPE_DIFFERENCING : DISK_TYPE_DYNAMIC,
    dataOffset: HEADER_OFFSET,
    creatorApp: CREATOR_APP,
    creatorOs: CREATOR_OS,
    uuid: uuid.subarray(0, 16),
  });
  footer.copy(head, 0);
  const header = buildDynamicHeader(BAT_OFFSET, entries, EXPORT_BLOCK_SIZE_BYTES);
  if (parent) {
    const path = Buffer.from(`.\\${parent.fileName}`, 'utf16le').subarray(0, SECTOR_BYTES);
    path.copy(head, locatorStart);
    path.copy(head, locatorStart + SECTOR_BYTES);
    setParent(header, {
      uuid: parent.uuid ?? Buffer.alloc(16),
      name: parent.fileName,
      locators: [
        { platformCode: LOCATOR_W2RU, dataOffset: locatorStart, data: path },
        { platformCode: LOCATOR_W2KU, dataOffset: locatorStart + SECTOR_BYTES, data: path },
      ],
    });
  }
  header.copy(head, HEADER_OFFSET);
  return { virtualSize, blocks, dataStart, size, head, footer };
}

/** The bytes [start, end) of the VHD stream. Callers bound start/end to [0, size]. */
async function* readLayout(
  image: BlockImage,
  extents: readonly Extent[],
  layout: VhdLayout,
  start: number,
  end: number,
): AsyncGenerator<Buffer, void, Buffer | undefined> {
  const { head, footer, dataStart, blocks, size } = layout;
  const footerStart = size - FOOTER_BYTES;
  // Shared by every readVirtual of this read; buffers handed back at our own
  // yields (bitmaps) go to them too.
  const buffers = new ReadBuffers();
  let pos = start;
  while (pos < end) {
    if (pos < dataStart) {
      const stop = Math.min(end, dataStart);
      buffers.giveBack(yield head.subarray(pos, stop));
      pos = stop;
      continue;
    }
    if (pos >= footerStart) {
      buffers.giveBack(yield footer.subarray(pos - footerStart, end - footerStart));
      pos = end;
      continue;
    }
    // A run of blocks that are consecutive in the disk too: one read of the disk serves it all.
    const first = Math.floor((pos - dataStart) / BLOCK_STRIDE_BYTES);
    let last = first;
    while (last + 1 < blocks.length && blocks[last + 1] === blocks[last] + 1) last++;
    const stop = Math.min(end, dataStart + (last + 1) * BLOCK_STRIDE_BYTES);
    yield* readBlockRun(image, extents, layout, buffers, pos, stop);
    pos = stop;
  }
}

/**
 * Stream bytes [from, to) lying in emitted blocks that are consecutive in
 * the disk: each block's bitmap, then its data. The data comes from one
 * readVirtual over the whole guest range, in pieces cut at block boundaries,
 * so the next block is read while this one is sent (a readVirtual per block
 * would wait for the socket at every block).
 */
async function* readBlockRun(
  image: BlockImage,
  extents: readonly Extent[],
  layout: VhdLayout,
  buffers: ReadBuffers,
  from: number,
  to: number,
): AsyncGenerator<Buffer, void, Buffer | undefined> {
  const { dataStart, blocks, virtualSize } = layout;
  const blockOf = (p: number) => Math.floor((p - dataStart) / BLOCK_STRIDE_BYTES);
  // Guest range of the data in [from, to): the blocks are consecutive in the disk, so it is one range.
  const fromIn = from - (dataStart + blockOf(from) * BLOCK_STRIDE_BYTES);
  const guestFrom = blocks[blockOf(from)] * EXPORT_BLOCK_SIZE_BYTES + Math.max(0, fromIn - BITMAP_BYTES);
  const lastIn = to - 1 - (dataStart + blockOf(to - 1) * BLOCK_STRIDE_BYTES);
  const guestTo =
    blocks[blockOf(to - 1)] * EXPORT_BLOCK_SIZE_BYTES +
    (lastIn < BITMAP_BYTES ? 0 : lastIn - BITMAP_BYTES + 1);
  const data = readVirtual(
    image,
    extents,
    Math.min(guestFrom, virtualSize),
    Math.min(guestTo, virtualSize),
    EXPORT_BLOCK_SIZE_BYTES,
    buffers,
  );
  try {
    let pos = from;
    while (pos < to) {
      const k = Math.floor((pos - dataStart) / BLOCK_STRIDE_BYTES);
      const blockStart = dataStart + k * BLOCK_STRIDE_BYTES;
      const blockEnd = Math.min(to, blockStart + BLOCK_STRIDE_BYTES);
      if (pos < blockStart + BITMAP_BYTES) {
        const bitmapStop = Math.min(blockEnd, blockStart + BITMAP_BYTES);
        buffers.giveBack(yield BITMAP_ALL_SET.subarray(pos - blockStart, bitmapStop - blockStart));
        pos = bitmapStop;
        continue;
      }
      const guest = blocks[k] * EXPORT_BLOCK_SIZE_BYTES + (pos - blockStart - BITMAP_BYTES);
      if (guest >= virtualSize) {
        // The last block reaches past the disk's end: zeros.
        buffers.giveBack(yield zeroBuffer(blockEnd - pos));
        pos = blockEnd;
        continue;
      }
      // Pieces are cut at block boundaries, so one never spans two blocks.
      const next = await data.next();
      if (next.done) throw new Error(`VHD export: disk data ended at guest offset ${guest}`);
      buffers.giveBack(yield next.value);
      pos += next.value.length;
    }
  } finally {
    await data.return(undefined);
  }
}

export async function serializeVhd(image: BlockImage, opts: SerializeOptions = {}): Promise<SerializedImage> {
  const extents = await image.extents();
  const layout = layoutVhd(image.virtualSize, extents, opts);
  const fileSpans = image.fileSpans?.bind(image);
  const pieces = (start: number, end: number) => layoutPieces(layout, start, end);
  return {
    size: layout.size,
    read(start, end) {
      if (
        !Number.isSafeInteger(start) ||
        !Number.isSafeInteger(end) ||
        start < 0 ||
        end > layout.size ||
        start > end
      ) {
        throw new RangeError(`range [${start}, ${end}) outside the ${layout.size}-byte VHD stream`);
      }
      return readLayout(image, extents, layout, start, end);
    },
    pieces,
    ...(fileSpans && { spans: (start, end) => formatSpans(pieces, extents, fileSpans, start, end) }),
  };
}

/** The pieces of [start, end) of the VHD stream (see SerializedImage.pieces); bounded by the caller. */
function layoutPieces(layout: VhdLayout, start: number, end: number): StreamPiece[] {
  const { head, footer, dataStart, blocks, size, virtualSize } = layout;
  const footerStart = size - FOOTER_BYTES;
  const out: StreamPiece[] = [];
  let pos = start;
  while (pos < end) {
    if (pos < dataStart) {
      const stop = Math.min(end, dataStart);
      out.push({ offset: pos, length: stop - pos, bytes: head.subarray(pos, stop) });
      pos = stop;
      continue;
    }
    if (pos >= footerStart) {
      out.push({
        offset: pos,
        length: end - pos,
        bytes: footer.subarray(pos - footerStart, end - footerStart),
      });
      break;
    }
    const k = Math.floor((pos - dataStart) / BLOCK_STRIDE_BYTES);
    const blockStart = dataStart + k * BLOCK_STRIDE_BYTES;
    const blockEnd = Math.min(end, blockStart + BLOCK_STRIDE_BYTES);
    if (pos < blockStart + BITMAP_BYTES) {
      const stop = Math.min(blockEnd, blockStart + BITMAP_BYTES);
      out.push({
        offset: pos,
        length: stop - pos,
        bytes: BITMAP_ALL_SET.subarray(pos - blockStart, stop - blockStart),
      });
      pos = stop;
      continue;
    }
    const guest = blocks[k] * EXPORT_BLOCK_SIZE_BYTES + (pos - blockStart - BITMAP_BYTES);
    const n = blockEnd - pos;
    // The last block may reach past the disk's end: zeros there.
    const readable = Math.max(0, Math.min(n, virtualSize - guest));
    if (readable > 0) out.push({ offset: guest, length: readable });
    if (n > readable)
      out.push({ offset: guest + readable, length: n - readable, bytes: zeroBuffer(n - readable) });
    pos = blockEnd;
  }
  return out;
}
