/**
 * VHD on-disk structures, from Microsoft's "Virtual Hard Disk Image Format
 * Specification" (v1.0, 2006):
 * - "Hard Disk Footer Format" (cookie, features, data offset, sizes, disk
 *   geometry, disk type, checksum, unique id) and "Appendix: CHS Calculation";
 * - "Dynamic Disk Header Format" (cookie, table offset, max table entries,
 *   block size, checksum, parent fields);
 * - "Block Allocation Table and Data Blocks" with its sector bitmap, and
 *   "Mapping a Disk Sector to a Sector in the Block" (a data block is a
 *   sector-padded bitmap, one bit per sector, then the block's sectors).
 *
 * Hand-written because no maintained npm library reads or writes VHD, and we
 * need a reader that treats every field as hostile plus a writer whose layout
 * is known before the first byte. On what an image means (its virtual size)
 * we follow qemu's block/vpc.c, our test oracle; on corruption we are
 * stricter than qemu (header checksum, BAT overlaps) and say so where we are.
 */

export const SECTOR_BYTES = 512;
export const FOOTER_BYTES = 512;
export const HEADER_BYTES = 1024;

export const FOOTER_COOKIE = 'conectix';
export const HEADER_COOKIE = 'cxsparse';

/** "Disk Type" values (footer offset 60). */
export const DISK_TYPE_FIXED = 2;
export const DISK_TYPE_DYNAMIC = 3;
export const DISK_TYPE_DIFFERENCING = 4;

/** A BAT entry that maps no block: the block reads as zeros. */
export const BAT_UNALLOCATED = 0xffffffff;

/** Largest CHS geometry the spec's algorithm yields (65535 cylinders, 16 heads, 255 sectors). */
export const MAX_CHS_SECTORS = 65535 * 16 * 255;

/**
 * qemu's limit (block/vpc.c VHD_MAX_SECTORS): 2040 GiB. Beyond it BAT
 * entries, which count 512-byte sectors in 32 bits, could no longer address
 * the blocks of a full disk.
 */
export const MAX_VIRTUAL_SIZE_BYTES = 2040 * 1024 * 1024 * 1024;

/** Footer field offsets ("Hard Disk Footer Format"). */
const F_COOKIE = 0;
const F_FEATURES = 8;
const F_VERSION = 12;
const F_DATA_OFFSET = 16;
const F_TIMESTAMP = 24;
const F_CREATOR_APP = 28;
const F_CREATOR_VERSION = 32;
const F_CREATOR_OS = 36;
const F_ORIGINAL_SIZE = 40;
const F_CURRENT_SIZE = 48;
const F_CYLINDERS = 56;
const F_HEADS = 58;
const F_SECTORS_PER_TRACK = 59;
const F_DISK_TYPE = 60;
const F_CHECKSUM = 64;
const F_UUID = 68;

/** Dynamic header field offsets ("Dynamic Disk Header Format"). */
const H_COOKIE = 0;
const H_DATA_OFFSET = 8;
const H_TABLE_OFFSET = 16;
const H_VERSION = 24;
const H_MAX_TABLE_ENTRIES = 28;
const H_BLOCK_SIZE = 32;
const H_CHECKSUM = 36;

/** Version 1.0 of the format, the only one there is ("File Format Version", "Header Version"). */
const FORMAT_VERSION = 0x00010000;
/** "Features": bit 1 is reserved and must always be set. */
const FEATURES_RESERVED = 0x00000002;

export interface Footer {
  cookie: string;
  /** Offset of the dynamic header; all ones for fixed disks. Kept as bigint: hostile values exceed 2^53. */
  dataOffset: bigint;
  creatorApp: string;
  originalSize: bigint;
  currentSize: bigint;
  cylinders: number;
  heads: number;
  sectorsPerTrack: number;
  diskType: number;
  checksum: number;
  /** Checksum recomputed over the bytes read. */
  computedChecksum: number;
}

export interface DynamicHeader {
  cookie: string;
  tableOffset: bigint;
  maxTableEntries: number;
  blockSizeBytes: number;
  checksum: number;
  computedChecksum: number;
}

/**
 * The spec's checksum: the one's complement of the byte sum of the structure,
 * the checksum field itself counted as zero.
 */
export function vhdChecksum(buf: Buffer, checksumOffset: number): number {
  let sum = 0;
  for (let i = 0; i < buf.length; i++) {
    if (i >= checksumOffset && i < checksumOffset + 4) continue;
    sum += buf[i];
  }
  return ~sum >>> 0;
}

export function parseFooter(buf: Buffer): Footer {
  return {
    cookie: buf.toString('latin1', F_COOKIE, F_COOKIE + 8),
    dataOffset: buf.readBigUInt64BE(F_DATA_OFFSET),
    creatorApp: buf.toString('latin1', F_CREATOR_APP, F_CREATOR_APP + 4),
    originalSize: buf.readBigUInt64BE(F_ORIGINAL_SIZE),
    currentSize: buf.readBigUInt64BE(F_CURRENT_SIZE),
    cylinders: buf.readUInt16BE(F_CYLINDERS),
    heads: buf.readUInt8(F_HEADS),
    sectorsPerTrack: buf.readUInt8(F_SECTORS_PER_TRACK),
    diskType: buf.readUInt32BE(F_DISK_TYPE),
    checksum: buf.readUInt32BE(F_CHECKSUM),
    computedChecksum: vhdChecksum(buf, F_CHECKSUM),
  };
}

export function parseDynamicHeader(buf: Buffer): DynamicHeader {
  return {
    cookie: buf.toString('latin1', H_COOKIE, H_COOKIE + 8),
    tableOffset: buf.readBigUInt64BE(H_TABLE_OFFSET),
    maxTableEntries: buf.readUInt32BE(H_MAX_TABLE_ENTRIES),
    blockSizeBytes: buf.readUInt32BE(H_BLOCK_SIZE),
    checksum: buf.readUInt32BE(H_CHECKSUM),
    computedChecksum: vhdChecksum(buf, H_CHECKSUM),
  };
}

/**
 * Creator applications whose images are sized by "Current Size" rather than
 * by CHS geometry. This is qemu's table (block/vpc.c, vpc_ignore_current_size):
 * Hyper-V ('win '), qemu with force_size ('qem2'), Disk2vhd ('d2v '),
 * XenConverter ('CTXS') and XenServer ('tap\0'). Anything else, Virtual PC
 * ('vpc ') and plain qemu ('qemu') included, is sized by geometry.
 */
const CURRENT_SIZE_CREATORS = new Set(['win ', 'qem2', 'd2v ', 'CTXS', 'tap\0']);

/**
 * The virtual size, decided exactly as qemu decides it so that what we import
 * matches `qemu-img info`: cylinders x heads x sectors-per-track sectors,
 * unless the creator is one that trusts "Current Size" or the geometry is the
 * maximum one (a size CHS cannot express), in which case "Current Size"
 * rounded down to whole sectors. Returned as bigint: a hostile current size
 * may exceed 2^53.
 */
export function footerVirtualSize(footer: Footer): bigint {
  const chsSectors = BigInt(footer.cylinders * footer.heads * footer.sectorsPerTrack);
  const useChs = !CURRENT_SIZE_CREATORS.has(footer.creatorApp);
  if (!useChs || chsSectors === BigInt(MAX_CHS_SECTORS)) {
    return (footer.currentSize / BigInt(SECTOR_BYTES)) * BigInt(SECTOR_BYTES);
  }
  return chsSectors * BigInt(SECTOR_BYTES);
}

export interface Geometry {
  cylinders: number;
  heads: number;
  sectorsPerTrack: number;
}

/**
 * The spec's appendix "CHS Calculation" (also qemu's calculate_geometry): the
 * geometry of a disk of `totalSectors`, which may round the size down. Our
 * exports are read by "Current Size" (creator 'win '), so this only matters
 * to geometry-minded readers, for whom it is the geometry Hyper-V would write.
 */
export function chsGeometry(totalSectors: number): Geometry {
  const sectors = Math.min(totalSectors, MAX_CHS_SECTORS);
  let sectorsPerTrack: number;
  let heads: number;
  let cylindersTimesHeads: number;
  if (sectors >= 65535 * 16 * 63) {
    sectorsPerTrack = 255;
    heads = 16;
    cylindersTimesHeads = Math.floor(sectors / sectorsPerTrack);
  } else {
    sectorsPerTrack = 17;
    cylindersTimesHeads = Math.floor(sectors / sectorsPerTrack);
    heads = Math.max(4, Math.floor((cylindersTimesHeads + 1023) / 1024));
    if (cylindersTimesHeads >= heads * 1024 || heads > 16) {
      sectorsPerTrack = 31;
      heads = 16;
      cylindersTimesHeads = Math.floor(sectors / sectorsPerTrack);
    }
    if (cylindersTimesHeads >= heads * 1024) {
      sectorsPerTrack = 63;
      heads = 16;
      cylindersTimesHeads = Math.floor(sectors / sectorsPerTrack);
    }
  }
  return { cylinders: Math.floor(cylindersTimesHeads / heads), heads, sectorsPerTrack };
}

/** Bytes of a block's sector bitmap on disk: one bit per sector, padded to whole sectors. */
export function bitmapBytesOnDisk(blockSizeBytes: number): number {
  const bits = blockSizeBytes / SECTOR_BYTES;
  return Math.ceil(bits / 8 / SECTOR_BYTES) * SECTOR_BYTES;
}

export interface FooterFields {
  virtualSizeBytes: number;
  diskType: number;
  /** Offset of the dynamic header. */
  dataOffset: number;
  creatorApp: string;
  creatorOs: string;
  uuid: Buffer;
}

/** Builds a footer with its checksum. Timestamp 0 (2000-01-01) keeps output deterministic. */
export function buildFooter(fields: FooterFields): Buffer {
  const buf = Buffer.alloc(FOOTER_BYTES);
  buf.write(FOOTER_COOKIE, F_COOKIE, 'latin1');
  buf.writeUInt32BE(FEATURES_RESERVED, F_FEATURES);
  buf.writeUInt32BE(FORMAT_VERSION, F_VERSION);
  buf.writeBigUInt64BE(BigInt(fields.dataOffset), F_DATA_OFFSET);
  buf.writeUInt32BE(0, F_TIMESTAMP);
  buf.write(fields.creatorApp, F_CREATOR_APP, 4, 'latin1');
  buf.writeUInt32BE(FORMAT_VERSION, F_CREATOR_VERSION);
  buf.write(fields.creatorOs, F_CREATOR_OS, 4, 'latin1');
  buf.writeBigUInt64BE(BigInt(fields.virtualSizeBytes), F_ORIGINAL_SIZE);
  buf.writeBigUInt64BE(BigInt(fields.virtualSizeBytes), F_CURRENT_SIZE);
  const g = chsGeometry(fields.virtualSizeBytes / SECTOR_BYTES);
  buf.writeUInt16BE(g.cylinders, F_CYLINDERS);
  buf.writeUInt8(g.heads, F_HEADS);
  buf.writeUInt8(g.sectorsPerTrack, F_SECTORS_PER_TRACK);
  buf.writeUInt32BE(fields.diskType, F_DISK_TYPE);
  fields.uuid.copy(buf, F_UUID, 0, 16);
  // Saved state (offset 84) and the reserved bytes stay zero.
  buf.writeUInt32BE(vhdChecksum(buf, F_CHECKSUM), F_CHECKSUM);
  return buf;
}

/** Builds a dynamic disk header (no parent) with its checksum. */
export function buildDynamicHeader(
  tableOffset: number,
  maxTableEntries: number,
  blockSizeBytes: number,
): Buffer {
  const buf = Buffer.alloc(HEADER_BYTES);
  buf.write(HEADER_COOKIE, H_COOKIE, 'latin1');
  // "Data Offset" is unused and all ones; qemu notes MS tools want all 64 bits set.
  buf.writeBigUInt64BE(0xffffffffffffffffn, H_DATA_OFFSET);
  buf.writeBigUInt64BE(BigInt(tableOffset), H_TABLE_OFFSET);
  buf.writeUInt32BE(FORMAT_VERSION, H_VERSION);
  buf.writeUInt32BE(maxTableEntries, H_MAX_TABLE_ENTRIES);
  buf.writeUInt32BE(blockSizeBytes, H_BLOCK_SIZE);
  buf.writeUInt32BE(vhdChecksum(buf, H_CHECKSUM), H_CHECKSUM);
  return buf;
}

/** Parent fields of a differencing disk's header ("Dynamic Disk Header Format"). */
const H_PARENT_UUID = 40;
const H_PARENT_TIMESTAMP = 56;
const H_PARENT_NAME = 64;
const PARENT_NAME_BYTES = 512;
const H_PARENT_LOCATORS = 576;
const LOCATOR_ENTRY_BYTES = 24;
/** Platform codes of the locators XCP-ng's vhd-util writes: Windows relative and absolute, UTF-16LE paths. */
export const LOCATOR_W2RU = 0x57327275;
export const LOCATOR_W2KU = 0x57326b75;

export interface ParentLocator {
  platformCode: number;
  /** Where the locator's data lies in the file, and its bytes (at most one sector). */
  dataOffset: number;
  data: Buffer;
}

/** A differencing disk header's parent unique id, as 32 hex digits. */
export function parentUuidOf(header: Buffer): string {
  return header.toString('hex', H_PARENT_UUID, H_PARENT_UUID + 16);
}

/**
 * Turns a dynamic header into a differencing disk's: the parent's unique id,
 * timestamp (0, as our exports write) and name, and its locators; then the
 * checksum again.
 */
export function setParent(
  header: Buffer,
  parent: { uuid: Buffer; name: string; locators: readonly ParentLocator[] },
): void {
  parent.uuid.copy(header, H_PARENT_UUID, 0, 16);
  header.writeUInt32BE(0, H_PARENT_TIMESTAMP);
  const name = Buffer.from(parent.name, 'utf16le').swap16();
  name.copy(header, H_PARENT_NAME, 0, Math.min(name.length, PARENT_NAME_BYTES));
  parent.locators.forEach((loc, i) => {
    const at = H_PARENT_LOCATORS + i * LOCATOR_ENTRY_BYTES;
    header.writeUInt32BE(loc.platformCode, at);
    // Data space in bytes (what Hyper-V writes; vhd-util reads either), data length in bytes.
    header.writeUInt32BE(SECTOR_BYTES, at + 4);
    header.writeUInt32BE(loc.data.length, at + 8);
    header.writeBigUInt64BE(BigInt(loc.dataOffset), at + 16);
  });
  header.writeUInt32BE(0, H_CHECKSUM);
  header.writeUInt32BE(vhdChecksum(header, H_CHECKSUM), H_CHECKSUM);
}

/** Test helpers reach the raw field offsets through this, to corrupt images on purpose. */
export const FOOTER_OFFSETS = {
  checksum: F_CHECKSUM,
  currentSize: F_CURRENT_SIZE,
  originalSize: F_ORIGINAL_SIZE,
  dataOffset: F_DATA_OFFSET,
  diskType: F_DISK_TYPE,
  creatorApp: F_CREATOR_APP,
  cylinders: F_CYLINDERS,
  heads: F_HEADS,
  sectorsPerTrack: F_SECTORS_PER_TRACK,
} as const;

export const HEADER_OFFSETS = {
  checksum: H_CHECKSUM,
  tableOffset: H_TABLE_OFFSET,
  maxTableEntries: H_MAX_TABLE_ENTRIES,
  blockSize: H_BLOCK_SIZE,
} as const;
