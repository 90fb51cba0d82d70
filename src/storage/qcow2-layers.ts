/**
 * Layers of qcow2 SRs (docs/design.md, "Layer files per SR format"): each is
 * a real qcow2 overlay whose header names its parent's file (its id, beside
 * it) as backing file with format qcow2, so qemu-img reads a VDI's top file
 * as the whole disk. What a layer defines is also kept in the contents table,
 * as for raw layers: the chain reader composes layers from it, and merges
 * are planned from it alone.
 *
 * The writes here follow the raw ones (image/raw-layer.ts, image/raw-merge.ts)
 * through formats/qcow2/patch.ts, which orders them so that a kill -9 leaves
 * every reader right and a rerun finishes the job.
 */
import { Qcow2Image } from '../formats/qcow2/index.js';
import { Qcow2Patch } from '../formats/qcow2/patch.js';
import { EXPORT_CLUSTER_SIZE_BYTES } from '../formats/qcow2/serialize.js';
import type { DiffRun } from '../image/block-diff.js';
import type { BlockImage, Extent } from '../image/block-image.js';
import type { DefinedRange } from '../image/chain-image.js';
import { complement, type MergeWriteOptions } from '../image/raw-merge.js';

/** Whole clusters, so each batch is one write of the patch. */
const COPY_BYTES = 64 * EXPORT_CLUSTER_SIZE_BYTES;

/**
 * Writes at `file` (created, or truncated) the overlay over `backing` of a
 * disk of `virtualSize` defining `runs` (in order: the clusters that differ
 * from the parent, as data, or as zero clusters where the new disk reads
 * zeros over the parent's data).
 */
export async function writeQcow2Layer(
  runs: AsyncIterable<DiffRun>,
  virtualSize: number,
  file: string,
  backing: string,
): Promise<{ defined: DefinedRange[] }> {
  const patch = await Qcow2Patch.create(file, virtualSize, backing);
  const defined: DefinedRange[] = [];
  try {
    for await (const run of runs) {
      if (run.data) await patch.write(run.start, run.data);
      else await patch.zero(run.start, run.length);
      const last = defined[defined.length - 1];
      if (last && last.start + last.length === run.start) last.length += run.length;
      else defined.push({ start: run.start, length: run.length });
    }
    await patch.commit();
  } finally {
    await patch.close();
  }
  return { defined };
}

/**
 * A down merge's copy: makes `defined` of the parent's file read as the
 * child's file does there (data clusters, zero clusters), growing it to
 * `size`. Readers of the chain read the child there, so they never see a
 * cluster being written; run again after a crash, it writes the same bytes
 * to the same places.
 */
export async function mergeQcow2Down(
  childFile: string,
  defined: readonly DefinedRange[],
  parentFile: string,
  sizes: { size: number; oldSize: number },
  opts: MergeWriteOptions,
): Promise<void> {
  const child = await Qcow2Image.open(childFile, { differencing: true });
  try {
    const patch = await Qcow2Patch.open(parentFile);
    try {
      if (sizes.size > patch.size) patch.grow(sizes.size);
      await copyInto(patch, await child.extents(), defined, child, opts);
      await patch.commit();
    } finally {
      await patch.close();
    }
  } finally {
    await child.close();
  }
}

/**
 * A flatten: fills the clusters the layer does not define with its parent's
 * view (the bytes its readers read through to there), then drops its
 * backing file: it reads the same, alone.
 */
export async function fillQcow2FromParent(
  layerFile: string,
  defined: readonly DefinedRange[],
  parent: BlockImage,
  size: number,
  opts: MergeWriteOptions,
): Promise<void> {
  const patch = await Qcow2Patch.open(layerFile);
  try {
    if (size > patch.size) patch.grow(size);
    const extents = (await parent.extents()).filter((e) => !e.zero);
    // Zeros need no cluster: without a backing file, an unallocated one reads as zeros.
    await copyInto(patch, extents, complement(defined, Math.min(size, parent.virtualSize)), parent, opts);
    await patch.commit({ backing: null });
  } finally {
    await patch.close();
  }
}

/** Names `parentName` as the backing file of the qcow2 layer at `file` (one header sector). */
export async function reparentQcow2(file: string, parentName: string): Promise<void> {
  const patch = await Qcow2Patch.open(file);
  try {
    if (patch.backing !== parentName) await patch.commit({ backing: parentName });
  } finally {
    await patch.close();
  }
}

/** Writes `ranges` ∩ data extents from `source`, and zero clusters for `ranges` ∩ zero extents. */
async function copyInto(
  patch: Qcow2Patch,
  extents: readonly Extent[],
  ranges: readonly DefinedRange[],
  source: BlockImage,
  opts: MergeWriteOptions,
): Promise<void> {
  const buf = Buffer.allocUnsafe(COPY_BYTES);
  let e = 0;
  for (const r of ranges) {
    const end = r.start + r.length;
    while (e < extents.length && extents[e].start + extents[e].length <= r.start) e++;
    for (let k = e; k < extents.length && extents[k].start < end; k++) {
      opts.signal?.throwIfAborted();
      const ext = extents[k];
      // Whole clusters: a layer's ranges, and qcow2 extents, are (but for the disk's end).
      const from = Math.max(ext.start, r.start);
      const to = Math.min(end, ext.start + ext.length, source.virtualSize);
      if (to <= from) continue;
      if (ext.zero) {
        await patch.zero(from, to - from);
        opts.onBytes?.(to - from);
        continue;
      }
      for (let at = from; at < to; ) {
        opts.signal?.throwIfAborted();
        const n = Math.min(COPY_BYTES, to - at);
        const data = await source.readInto(buf.subarray(0, n), at);
        await patch.write(at, data);
        opts.onBytes?.(n);
        at += n;
      }
    }
  }
}
