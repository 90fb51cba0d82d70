/**
 * Where a source file's data is: the pieces worth sending. The file system
 * tells where the holes are (SEEK_DATA/SEEK_HOLE, `fileExtents`); allocated
 * blocks that hold only zeros are found by reading them. Zeros are never
 * sent: the server is told they are zeros (a `zero` operation).
 */
import type { FileHandle } from 'node:fs/promises';
import { fileExtents } from '../image/sparse.js';
import { isZero } from '../image/zero.js';

export { isZero };

/** Granularity of zero detection inside a piece. */
export const ZERO_BLOCK_BYTES = 64 * 1024;
/** Zero runs shorter than this inside data are sent anyway: one request less is worth more. */
export const MIN_SKIP_BYTES = 256 * 1024;

export interface Piece {
  start: number;
  end: number;
}

/**
 * The pieces of [0, size) that hold data per the file system, cut on a grid
 * of `chunkBytes` so that pieces never cross a chunk boundary. Holes are left
 * out; `holeBytes` counts them.
 */
export function dataPieces(
  handle: FileHandle,
  size: number,
  chunkBytes: number,
): { pieces: Piece[]; holeBytes: number } {
  const pieces: Piece[] = [];
  let holeBytes = 0;
  for (const e of fileExtents(handle.fd, size)) {
    if (e.zero) {
      holeBytes += e.length;
      continue;
    }
    for (let s = e.start; s < e.start + e.length; ) {
      const end = Math.min(e.start + e.length, (Math.floor(s / chunkBytes) + 1) * chunkBytes);
      pieces.push({ start: s, end });
      s = end;
    }
  }
  return { pieces, holeBytes };
}

/**
 * The runs of `buf` (which holds the file from `offset`) worth sending:
 * non-zero blocks, with zero gaps shorter than MIN_SKIP_BYTES kept inside.
 */
export function dataRuns(buf: Buffer, offset: number): Piece[] {
  const runs: Piece[] = [];
  let runStart = -1;
  let zeroFrom = -1;
  for (let b = 0; b < buf.length; b += ZERO_BLOCK_BYTES) {
    const end = Math.min(buf.length, b + ZERO_BLOCK_BYTES);
    if (isZero(buf, b, end)) {
      if (runStart >= 0 && zeroFrom < 0) zeroFrom = b;
      continue;
    }
    if (runStart < 0) runStart = b;
    else if (zeroFrom >= 0 && b - zeroFrom >= MIN_SKIP_BYTES) {
      runs.push({ start: offset + runStart, end: offset + zeroFrom });
      runStart = b;
    }
    zeroFrom = -1;
  }
  if (runStart >= 0)
    runs.push({ start: offset + runStart, end: offset + (zeroFrom >= 0 ? zeroFrom : buf.length) });
  return runs;
}
