/**
 * The two writes a merge of a raw chain makes (docs/design.md, "Merge"),
 * each into a layer file that readers may hold open, and each safe for them:
 *
 * - mergeDefinedInto: a child layer's defined ranges copied **down** into its
 *   parent's file, where the child overrides them for every reader of the
 *   chain (child over parent), so nobody sees a half-written block;
 * - fillFromParent: a layer's undefined ranges filled from its parent's view,
 *   the very bytes its readers read through to there, so the layer can stop
 *   naming a parent.
 *
 * Both are idempotent (same bytes to the same places), so a merge cut by a
 * kill -9 is run again from the start. Memory: one 4 MiB buffer.
 */
import { constants as fsConstants, promises as fsp } from 'node:fs';
import type { BlockImage, Extent } from './block-image.js';
import type { DefinedRange } from './chain-image.js';
import { readAt, writeFully } from './file-io.js';
import { fileExtents, zeroRange } from './sparse.js';

const COPY_BYTES = 4 * 1024 * 1024;

export interface MergeWriteOptions {
  signal?: AbortSignal;
  /** Bytes of the ranges handled so far (data and zeros alike), as they go. */
  onBytes?: (n: number) => void;
}

/**
 * Makes `defined` of `targetFile` read as they read in `sourceFile` (the
 * child's data, its holes as zeros), grows the target to `size` if shorter
 * (what lies past `oldSize` and outside `defined` reads as zeros), and fsyncs.
 */
export async function mergeDefinedInto(
  sourceFile: string,
  defined: readonly DefinedRange[],
  targetFile: string,
  sizes: { size: number; oldSize: number },
  opts: MergeWriteOptions = {},
): Promise<void> {
  const source = await fsp.open(sourceFile, fsConstants.O_RDONLY);
  try {
    const target = await fsp.open(targetFile, fsConstants.O_RDWR);
    try {
      const length = (await target.stat()).size;
      if (length < sizes.size) await target.truncate(sizes.size);
      // An earlier, abandoned merge may have written past the old end.
      if (sizes.size > sizes.oldSize) await zeroRange(target, sizes.oldSize, sizes.size - sizes.oldSize);
      const extents = fileExtents(source.fd, sizes.size);
      await copyRanges(extents, defined, target, (buf, offset) => readAt(source, buf, offset), opts);
      await target.sync();
    } finally {
      await target.close();
    }
  } finally {
    await source.close();
  }
}

/**
 * Makes every range of `targetFile` outside `defined` (within [0, size)) read
 * as `parent` reads there, and fsyncs: the layer then holds its whole view.
 */
export async function fillFromParent(
  targetFile: string,
  defined: readonly DefinedRange[],
  parent: BlockImage,
  size: number,
  opts: MergeWriteOptions = {},
): Promise<void> {
  const target = await fsp.open(targetFile, fsConstants.O_RDWR);
  try {
    if ((await target.stat()).size < size) await target.truncate(size);
    const extents = await parent.extents();
    // Past the parent's end, the layer's view is zeros.
    if (parent.virtualSize < size) {
      extents.push({ start: parent.virtualSize, length: size - parent.virtualSize, zero: true });
    }
    await copyRanges(
      extents,
      complement(defined, size),
      target,
      (buf, offset) => parent.readInto(buf, offset),
      opts,
    );
    await target.sync();
  } finally {
    await target.close();
  }
}

/** Copies `ranges` ∩ data extents with `read`, and zeroes `ranges` ∩ zero extents. */
async function copyRanges(
  extents: readonly Extent[],
  ranges: readonly DefinedRange[],
  target: fsp.FileHandle,
  read: (buf: Buffer, offset: number) => Promise<Buffer>,
  opts: MergeWriteOptions,
): Promise<void> {
  const buf = Buffer.allocUnsafe(COPY_BYTES);
  let e = 0;
  for (const r of ranges) {
    const end = r.start + r.length;
    while (e < extents.length && extents[e].start + extents[e].length <= r.start) e++;
    for (let k = e, pos = r.start; pos < end; k++) {
      opts.signal?.throwIfAborted();
      // Beyond the last extent (a short file), zeros.
      const ext = extents[k] ?? { start: pos, length: end - pos, zero: true };
      const to = Math.min(end, ext.start + ext.length);
      if (to <= pos) continue;
      if (ext.zero) {
        await zeroRange(target, pos, to - pos);
        opts.onBytes?.(to - pos);
      } else {
        for (let at = pos; at < to; ) {
          opts.signal?.throwIfAborted();
          const n = Math.min(COPY_BYTES, to - at);
          const data = await read(buf.subarray(0, n), at);
          if (data.length < n) buf.fill(0, data.length, n);
          await writeFully(target, buf, 0, n, at);
          opts.onBytes?.(n);
          at += n;
        }
      }
      pos = to;
    }
  }
}

/** [0, size) less `defined` (sorted, non-overlapping). */
export function complement(defined: readonly DefinedRange[], size: number): DefinedRange[] {
  const out: DefinedRange[] = [];
  let pos = 0;
  for (const d of defined) {
    const start = Math.min(d.start, size);
    if (start > pos) out.push({ start: pos, length: start - pos });
    pos = Math.max(pos, Math.min(size, d.start + d.length));
  }
  if (pos < size) out.push({ start: pos, length: size - pos });
  return out;
}

/** The union of two sorted range lists, sorted and merged. */
export function unionRanges(a: readonly DefinedRange[], b: readonly DefinedRange[]): DefinedRange[] {
  const all = [...a, ...b].sort((x, y) => x.start - y.start);
  const out: DefinedRange[] = [];
  for (const r of all) {
    const last = out[out.length - 1];
    if (last && r.start <= last.start + last.length) {
      last.length = Math.max(last.length, r.start + r.length - last.start);
    } else if (r.length > 0) out.push({ start: r.start, length: r.length });
  }
  return out;
}
