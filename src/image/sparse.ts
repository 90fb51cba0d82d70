/**
 * Where a sparse file's data lives, from the file system itself.
 *
 * Choice (see README, "Knowing where the holes are"): a tiny N-API addon
 * (native/seek_hole.c) exposing lseek(SEEK_DATA/SEEK_HOLE), rather than an
 * allocation bitmap kept beside each image. The file system already tracks
 * allocation exactly and crash-consistently; a bitmap of our own would be a
 * second truth to keep in step through every write, rename and kill -9.
 * If the addon is missing (not built), every file reads as fully allocated:
 * slower, never wrong.
 */

import { promises as fsp } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { type Extent, mergeExtents } from './block-image.js';
import { writeFully } from './file-io.js';
import { addon } from './native.js';
import { ZEROS } from './zero.js';

export const sparseSupported = addon !== null;

/**
 * Data and hole extents of an open file, limited to [0, size). Regions past
 * the end of the file (when size exceeds it) are holes.
 */
export function fileExtents(fd: number, size: number): Extent[] {
  if (size === 0) return [];
  if (!addon) return [{ start: 0, length: size, zero: false }];
  const out: Extent[] = [];
  let pos = 0;
  while (pos < size) {
    const data = addon.seekData(fd, pos);
    if (data < 0 || data >= size) {
      out.push({ start: pos, length: size - pos, zero: true });
      break;
    }
    if (data > pos) out.push({ start: pos, length: data - pos, zero: true });
    const hole = Math.min(addon.seekHole(fd, data), size);
    const end = hole < 0 ? size : hole;
    out.push({ start: data, length: end - data, zero: false });
    pos = end;
  }
  return mergeExtents(out);
}

/**
 * Makes [offset, offset + length) of an open file read as zeros, freeing its
 * blocks where the file system can (a hole), writing zeros where it cannot.
 */
export async function zeroRange(handle: FileHandle, offset: number, length: number): Promise<void> {
  if (length <= 0) return;
  if (addon?.punchHole(handle.fd, offset, length)) return;
  for (let pos = offset; pos < offset + length; ) {
    const n = Math.min(ZEROS.length, offset + length - pos);
    await writeFully(handle, ZEROS, 0, n, pos);
    pos += n;
  }
}

/** Asks the kernel to drop a file's cached pages (posix_fadvise DONTNEED); a hint, never an error. */
export async function dropCachedPages(file: string): Promise<void> {
  if (!addon) return;
  const handle = await fsp.open(file, 'r').catch(() => null);
  if (!handle) return;
  try {
    addon.dropCache(handle.fd);
  } finally {
    await handle.close();
  }
}
