/**
 * qcow2 header parsing and validation, kept apart from the image so that it
 * can be read and tested alone.
 *
 * Implements these sections of qemu's docs/interop/qcow2.txt:
 * - "Header" (version 2 and 3 fields, incompatible / compatible / autoclear
 *   feature bits, refcount_order, header_length)
 * - "Additional fields (version 3 and higher)" (compression_type)
 * - "Header extensions", "String header extensions" and "Feature name table"
 *   (to name the backing file, the external data file and unknown features in
 *   refusals)
 *
 * Hand-written because no maintained npm package reads qcow2, and because a
 * hostile header must be refused before it can make us allocate or loop: every
 * size read here is checked against the file's real size first.
 */
import { ApiError, formatBytes, MalformedImageError, UnsupportedImageError } from '../../errors.js';

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"
export const MIN_CLUSTER_BITS = 9;
/** qemu refuses cluster sizes above 2 MiB; so do we. */
export const MAX_CLUSTER_BITS = 21;
/** Extended L2 entries need 32 subclusters of at least 512 bytes. */
export const MIN_EXTENDED_L2_CLUSTER_BITS = 14;
export const V2_HEADER_LENGTH_BYTES = 72;
export const V3_MIN_HEADER_LENGTH_BYTES = 104;
/** Largest virtual disk diskport accepts in a qcow2 image. */
export const MAX_VIRTUAL_SIZE_BYTES = 64 * 1024 ** 4;
/** qemu's implementation limit on the L1 table (QCOW_MAX_L1_SIZE). */
export const MAX_L1_TABLE_BYTES = 32 * 1024 * 1024;
/** The spec limits a backing file name to 1023 bytes. */
const MAX_BACKING_FILE_NAME_BYTES = 1023;

export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION_TYPE = 1n << 3n;
export const INCOMPAT_EXTENDED_L2 = 1n << 4n;
const KNOWN_INCOMPAT = 0x1fn;

const EXT_END = 0x00000000;
const EXT_BACKING_FORMAT = 0xe2792aca;
const EXT_FEATURE_NAME_TABLE = 0x6803f857;
const EXT_DATA_FILE_NAME = 0x44415441;
const FEATURE_NAME_ENTRY_BYTES = 48;
/** qemu's unit of disk size (BDRV_SECTOR_SIZE). */
const SECTOR_BYTES = 512;

export interface Qcow2Header {
  version: 2 | 3;
  clusterBits: number;
  clusterSizeBytes: number;
  virtualSizeBytes: number;
  l1Entries: number;
  l1TableOffset: number;
  /** Guest clusters (L2 entries) described by one L2 table. */
  l2Entries: number;
  /** Bytes per L2 entry: 8, or 16 with extended L2 entries. */
  l2EntryBytes: number;
  extendedL2: boolean;
  /** Dirty images are read: only refcounts may be stale, and we never read refcounts. */
  dirty: boolean;
  /** The backing file an overlay names (opened with `backing` allowed), or null. */
  backingFile: string | null;
}

function u64(buf: Buffer, offset: number): bigint {
  return buf.readBigUInt64BE(offset);
}

/** A 64-bit field that must fit a JS number to be usable as an offset; `limit` bounds it. */
function smallU64(buf: Buffer, offset: number, what: string, limit: number): number {
  const v = u64(buf, offset);
  if (v > BigInt(limit)) {
    throw new MalformedImageError('qcow2', `${what} ${v} lies beyond the end of the ${limit}-byte file`);
  }
  return Number(v);
}

/** Reads the few fields needed to know how much of the file the header may span. */
export function peekClusterBits(head: Buffer): number {
  if (head.length < V2_HEADER_LENGTH_BYTES) {
    throw new MalformedImageError('qcow2', `file of ${head.length} bytes is shorter than a qcow2 header`);
  }
  if (head.readUInt32BE(0) !== QCOW2_MAGIC) {
    throw new MalformedImageError('qcow2', 'bad magic: the file does not start with "QFI\\xfb"');
  }
  const version = head.readUInt32BE(4);
  if (version !== 2 && version !== 3) {
    throw new UnsupportedImageError('qcow2', `version ${version} (diskport reads versions 2 and 3)`, {
      feature: 'version',
    });
  }
  const clusterBits = head.readUInt32BE(20);
  if (clusterBits < MIN_CLUSTER_BITS) {
    throw new MalformedImageError('qcow2', `cluster_bits ${clusterBits} is below the minimum of 9`);
  }
  if (clusterBits > MAX_CLUSTER_BITS) {
    throw new UnsupportedImageError(
      'qcow2',
      `cluster size 2^${clusterBits} bytes exceeds the 2 MiB limit that qemu also enforces`,
      { feature: 'cluster_size' },
    );
  }
  return clusterBits;
}

function readString(buf: Buffer, start: number, length: number): string {
  return buf.toString('utf8', start, Math.min(buf.length, start + length)).replace(/\0+$/, '');
}

/**
 * Parses and validates the header held in `head` (the first cluster of the
 * file, or the whole file if shorter). Refuses images whose features diskport
 * cannot honour with UnsupportedImageError (422) naming the feature, and
 * inconsistent headers with MalformedImageError (400).
 */
export function parseHeader(
  head: Buffer,
  fileSizeBytes: number,
  opts: { backing?: boolean } = {},
): Qcow2Header {
  const clusterBits = peekClusterBits(head);
  const clusterSizeBytes = 2 ** clusterBits;
  const version = head.readUInt32BE(4) as 2 | 3;

  let headerLengthBytes = V2_HEADER_LENGTH_BYTES;
  let incompatible = 0n;
  if (version === 3) {
    if (head.length < V3_MIN_HEADER_LENGTH_BYTES) {
      throw new MalformedImageError(
        'qcow2',
        `file of ${head.length} bytes is shorter than a version 3 header`,
      );
    }
    headerLengthBytes = head.readUInt32BE(100);
    if (headerLengthBytes < V3_MIN_HEADER_LENGTH_BYTES || headerLengthBytes % 8 !== 0) {
      throw new MalformedImageError(
        'qcow2',
        `header_length ${headerLengthBytes} must be a multiple of 8 and at least ${V3_MIN_HEADER_LENGTH_BYTES}`,
      );
    }
    if (headerLengthBytes > clusterSizeBytes || headerLengthBytes > head.length) {
      throw new MalformedImageError(
        'qcow2',
        `header_length ${headerLengthBytes} exceeds the first cluster or the file`,
      );
    }
    incompatible = u64(head, 72);
    const refcountOrder = head.readUInt32BE(96);
    if (refcountOrder > 6) {
      throw new MalformedImageError('qcow2', `refcount_order ${refcountOrder} exceeds 6`);
    }
  }

  // Header extensions: bounded by the first cluster (or by the backing file
  // name, which qemu stores after them); each step advances at least 8 bytes.
  const backingFileOffsetBig = u64(head, 8);
  const backingFileSize = head.readUInt32BE(16);
  let extEnd = Math.min(head.length, clusterSizeBytes);
  if (backingFileOffsetBig !== 0n && backingFileOffsetBig < BigInt(extEnd)) {
    extEnd = Number(backingFileOffsetBig);
  }
  const featureNames = new Map<string, string>();
  let dataFileName = '';
  let backingFormat = '';
  let pos = headerLengthBytes;
  while (pos + 8 <= extEnd) {
    const type = head.readUInt32BE(pos);
    const length = head.readUInt32BE(pos + 4);
    if (type === EXT_END) break;
    const dataStart = pos + 8;
    if (length > extEnd - dataStart) {
      throw new MalformedImageError(
        'qcow2',
        `header extension 0x${type.toString(16)} of ${length} bytes at ${pos} runs past the first cluster`,
      );
    }
    if (type === EXT_FEATURE_NAME_TABLE) {
      for (
        let e = dataStart;
        e + FEATURE_NAME_ENTRY_BYTES <= dataStart + length;
        e += FEATURE_NAME_ENTRY_BYTES
      ) {
        featureNames.set(`${head[e]}:${head[e + 1]}`, readString(head, e + 2, FEATURE_NAME_ENTRY_BYTES - 2));
      }
    } else if (type === EXT_DATA_FILE_NAME) {
      dataFileName = readString(head, dataStart, length);
    } else if (type === EXT_BACKING_FORMAT) {
      backingFormat = readString(head, dataStart, length);
    }
    pos = dataStart + Math.ceil(length / 8) * 8;
  }

  // Refusals first: a client is better served by "this image has a backing
  // file" than by a complaint about some field that follows from it.
  let backingFile: string | null = null;
  if (backingFileOffsetBig !== 0n) {
    let name = '';
    if (
      backingFileSize > 0 &&
      backingFileSize <= MAX_BACKING_FILE_NAME_BYTES &&
      backingFileOffsetBig + BigInt(backingFileSize) <= BigInt(head.length)
    ) {
      name = readString(head, Number(backingFileOffsetBig), backingFileSize);
    }
    if (!opts.backing) {
      const what = name ? ` '${name}'${backingFormat ? ` (${backingFormat})` : ''}` : '';
      throw new UnsupportedImageError(
        'qcow2',
        `backing file${what} is not supported; flatten the chain first with 'qemu-img convert -O qcow2'`,
        { feature: 'backing_file', ...(name ? { backing_file: name } : {}) },
      );
    }
    // An overlay: what it leaves unallocated reads from its backing file,
    // which the caller supplies. Its name must be where the header says.
    if (!name) {
      throw new MalformedImageError(
        'qcow2',
        `backing file name (${backingFileSize} bytes at offset ${backingFileOffsetBig}) is empty, longer than ` +
          `${MAX_BACKING_FILE_NAME_BYTES} bytes or outside the first cluster`,
      );
    }
    backingFile = name;
  }
  const cryptMethod = head.readUInt32BE(32);
  if (cryptMethod !== 0) {
    const kind = cryptMethod === 1 ? 'AES' : cryptMethod === 2 ? 'LUKS' : `method ${cryptMethod}`;
    throw new UnsupportedImageError(
      'qcow2',
      `encryption (${kind}) is not supported; decrypt it first with 'qemu-img convert'`,
      { feature: 'encryption', crypt_method: cryptMethod },
    );
  }
  if (incompatible & INCOMPAT_DATA_FILE) {
    throw new UnsupportedImageError(
      'qcow2',
      `external data file${dataFileName ? ` '${dataFileName}'` : ''} (incompatible feature bit 2) is not supported; ` +
        "merge it first with 'qemu-img convert -O qcow2'",
      { feature: 'data_file' },
    );
  }
  const unknown = incompatible & ~KNOWN_INCOMPAT;
  if (unknown !== 0n) {
    const bits: string[] = [];
    for (let bit = 0n; bit < 64n; bit++) {
      if (unknown & (1n << bit)) {
        const name = featureNames.get(`0:${bit}`);
        bits.push(name ? `${bit} (${name})` : `${bit}`);
      }
    }
    throw new UnsupportedImageError('qcow2', `unknown incompatible feature bit(s) ${bits.join(', ')}`, {
      feature: 'incompatible_features',
      bits: bits.join(','),
    });
  }
  if (incompatible & INCOMPAT_CORRUPT) {
    throw new UnsupportedImageError(
      'qcow2',
      "the image is marked corrupt (incompatible feature bit 1); repair it with 'qemu-img check -r all'",
      { feature: 'corrupt' },
    );
  }
  const compressionType = headerLengthBytes > 104 ? head[104] : 0;
  if (incompatible & INCOMPAT_COMPRESSION_TYPE) {
    if (compressionType === 0) {
      throw new MalformedImageError('qcow2', 'compression type bit is set but compression_type is zlib (0)');
    }
    const name = compressionType === 1 ? 'zstd' : `type ${compressionType}`;
    throw new UnsupportedImageError(
      'qcow2',
      `${name} compression (incompatible feature bit 3) is not supported; recompress with zlib using 'qemu-img convert -c -o compression_type=zlib'`,
      { feature: 'compression_type' },
    );
  }
  if (compressionType !== 0) {
    throw new MalformedImageError(
      'qcow2',
      `compression_type ${compressionType} without the compression type bit`,
    );
  }
  const extendedL2 = (incompatible & INCOMPAT_EXTENDED_L2) !== 0n;
  if (extendedL2 && clusterBits < MIN_EXTENDED_L2_CLUSTER_BITS) {
    throw new MalformedImageError(
      'qcow2',
      `extended L2 entries need clusters of 16 KiB or more, not 2^${clusterBits}`,
    );
  }

  const sizeBig = u64(head, 24);
  if (sizeBig > BigInt(MAX_VIRTUAL_SIZE_BYTES)) {
    throw new ApiError(
      'TOO_LARGE',
      `qcow2 image virtual size ${sizeBig} bytes exceeds the ${formatBytes(MAX_VIRTUAL_SIZE_BYTES)} limit`,
      { virtual_size: sizeBig.toString() },
    );
  }
  // qemu counts the disk in whole 512-byte sectors (total_sectors = size /
  // 512): a last partial sector is not part of the disk it reads, so it is
  // not part of ours either.
  const headerSizeBytes = Number(sizeBig);
  const virtualSizeBytes = headerSizeBytes - (headerSizeBytes % SECTOR_BYTES);

  const l2EntryBytes = extendedL2 ? 16 : 8;
  const l2Entries = clusterSizeBytes / l2EntryBytes;
  const l1Entries = head.readUInt32BE(36);
  const neededL1Entries = Math.ceil(headerSizeBytes / (clusterSizeBytes * l2Entries));
  if (l1Entries < neededL1Entries) {
    throw new MalformedImageError(
      'qcow2',
      `L1 table of ${l1Entries} entries is too small for a ${headerSizeBytes}-byte disk (needs ${neededL1Entries})`,
    );
  }
  // Entries past what the disk needs are never read (they can only hold VM
  // state of snapshots), so only the needed part has to be in the file.
  if (neededL1Entries * 8 > MAX_L1_TABLE_BYTES) {
    throw new UnsupportedImageError(
      'qcow2',
      `L1 table of ${neededL1Entries * 8} bytes exceeds qemu's 32 MiB limit; use larger clusters`,
      { feature: 'l1_size' },
    );
  }
  let l1TableOffset = 0;
  if (neededL1Entries > 0) {
    l1TableOffset = smallU64(head, 40, 'l1_table_offset', fileSizeBytes);
    if (l1TableOffset % clusterSizeBytes !== 0 || l1TableOffset === 0) {
      throw new MalformedImageError(
        'qcow2',
        `L1 table offset ${l1TableOffset} is not a non-zero cluster boundary`,
      );
    }
    if (l1TableOffset + neededL1Entries * 8 > fileSizeBytes) {
      throw new MalformedImageError(
        'qcow2',
        `L1 table at ${l1TableOffset} (${neededL1Entries} entries) runs past the end of the ${fileSizeBytes}-byte file`,
      );
    }
  }

  return {
    version,
    clusterBits,
    clusterSizeBytes,
    virtualSizeBytes,
    // The entries read: those of the disk qemu reads (at most neededL1Entries).
    l1Entries: Math.ceil(virtualSizeBytes / (clusterSizeBytes * l2Entries)),
    l1TableOffset,
    l2Entries,
    l2EntryBytes,
    extendedL2,
    dirty: (incompatible & INCOMPAT_DIRTY) !== 0n,
    backingFile,
  };
}
