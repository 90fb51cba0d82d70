/**
 * What an upload may be: how large for its VDI and format, and the checksum
 * it declares, checked at creation and verified at finalize.
 */
import { ApiError } from '../errors.js';
import { RawFileImage } from '../image/raw-file-image.js';
import { ResizedImage } from '../image/resized-image.js';
import { hashImage } from '../ops/checksum.js';
import type { Vdi } from '../storage/vdis.js';

const CHECKSUM_PATTERN = /^(sha256|sha1|md5):([0-9a-f]+)$/;
const CHECKSUM_HEX_LENGTH: Record<string, number> = { sha256: 64, sha1: 40, md5: 32 };

/**
 * Largest upload accepted for a disk of `virtualSize` in `format`: the disk
 * itself plus room for the container's metadata (qcow2 with 512-byte clusters
 * spends 1/64 on L2 tables and a little on refcounts).
 */
export function uploadLimit(format: string, virtualSize: number): number {
  return format === 'raw' ? virtualSize : virtualSize + Math.ceil(virtualSize / 32) + 16 * 1024 * 1024;
}

export function checkDeclaredSize(size: number, format: string, vdi: Vdi): void {
  if (!Number.isSafeInteger(size) || size < 0)
    throw new ApiError('INVALID_REQUEST', `size must be a byte count, got ${size}`);
  const limit = uploadLimit(format, vdi.virtual_size);
  if (size > limit) {
    throw new ApiError(
      'TOO_LARGE',
      `upload is larger than the VDI: ${size} bytes declared, ${format === 'raw' ? 'VDI virtual size is' : 'a ' + format + ' image of this VDI can be at most'} ${limit} bytes`,
      { size, limit, virtual_size: vdi.virtual_size },
    );
  }
}

/**
 * Space an upload of `total` bytes must find free up front, `have` of them
 * already staged. A raw stream is the disk itself: its zeros are never
 * stored, so its length says nothing of the space it takes (a 100 GiB disk
 * holding 2 GiB of data imports into 5 GiB), and it is not refused before it
 * runs out. vhd and qcow2 streams are compact (only allocated blocks), so
 * their length is the space they take staged, and as much again when
 * finalize converts them by a copy rather than a link or a streamed import.
 */
export function spaceNeeded(
  total: number,
  have: number,
  format: string,
  vdi: Vdi,
  checksum: string | null | undefined,
): number {
  if (format === 'raw') return 0;
  const linked = format === vdi.image_format;
  const streamed = vdi.image_format === 'raw' && !checksum;
  return Math.max(0, total - have) + (linked || streamed ? 0 : total);
}

export function parseChecksum(value: string): { algorithm: 'sha256' | 'sha1' | 'md5'; hex: string } {
  const m = CHECKSUM_PATTERN.exec(value.toLowerCase());
  if (!m || CHECKSUM_HEX_LENGTH[m[1]] !== m[2].length) {
    throw new ApiError(
      'INVALID_CHECKSUM',
      `checksum must be 'sha256:<64 hex digits>' (or sha1:/md5:), got '${value}'`,
    );
  }
  return { algorithm: m[1] as 'sha256' | 'sha1' | 'md5', hex: m[2] };
}

/** Hashes the staged stream [0, length), holes from memory, and compares with the declared checksum. */
export async function verifyChecksum(
  staged: string,
  fileSize: number,
  streamSize: number,
  checksum: string,
  signal: AbortSignal,
): Promise<void> {
  const { algorithm, hex } = parseChecksum(checksum);
  const file = await RawFileImage.open(staged, { virtualSize: fileSize });
  // The stream is [0, streamSize); a raw staging file is as long as the whole disk.
  const image = new ResizedImage(file, streamSize);
  try {
    const actual = await hashImage(image, await image.extents(), algorithm, { signal });
    if (actual !== hex) {
      throw new ApiError(
        'CHECKSUM_MISMATCH',
        `the upload's ${algorithm} is ${actual}, not the declared ${hex}; nothing was changed, send the image again`,
        {
          expected: hex,
          actual,
        },
      );
    }
  } finally {
    await image.close();
  }
}
