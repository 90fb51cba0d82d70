/**
 * What a new layer must hold for `next` to read right over `parent`: the
 * blocks where the two differ, each as data or as zeros defined over the
 * parent's data (docs/design.md, "How a commit writes a layer"). Blocks that
 * read the same in both are left out, so a whole-image import that rewrites
 * identical bytes adds nothing to a chain.
 *
 * Extents decide the cheap cases without reading: a block that both report
 * as zero is skipped unseen, and the walk only visits the union of the two
 * images' data. Elsewhere the bytes are read and compared, a chunk at a
 * time, so memory stays at two chunks whatever the disk's size.
 */
import type { BlockImage, Extent } from './block-image.js';
import { isZero } from './zero.js';

export const DIFF_BLOCK_BYTES = 64 * 1024;
const CHUNK_BLOCKS = 16;

export interface DiffRun {
  start: number;
  length: number;
  /** Zeros over the parent's data (the layer defines the range, stores nothing). */
  zero: boolean;
  /** A data run's bytes: a view valid until the generator is resumed. */
  data?: Buffer;
}

/**
 * The runs, in order, that a layer over `parent` defines so that it reads as
 * `next`. Past the parent's end it reads as zeros (a grown disk).
 */
export async function* diffBlocks(
  next: BlockImage,
  parent: BlockImage,
  opts: { blockBytes?: number; signal?: AbortSignal } = {},
): AsyncGenerator<DiffRun> {
  const block = opts.blockBytes ?? DIFF_BLOCK_BYTES;
  const size = next.virtualSize;
  const chunkBytes = block * CHUNK_BLOCKS;
  const nextBuf = Buffer.alloc(chunkBytes);
  const parentBuf = Buffer.alloc(chunkBytes);
  for (const area of dataAreas([await next.extents(), await parent.extents()], size, block)) {
    for (let start = area.start; start < area.end; start += chunkBytes) {
      opts.signal?.throwIfAborted();
      const end = Math.min(area.end, start + chunkBytes);
      const mine = await next.readInto(nextBuf.subarray(0, end - start), start);
      const theirs = parentBuf.subarray(0, end - start);
      const got = start < parent.virtualSize ? await parent.readInto(theirs, start) : theirs.subarray(0, 0);
      theirs.fill(0, got.length);
      let run: DiffRun | null = null;
      for (let at = 0; at < mine.length; at += block) {
        const to = Math.min(mine.length, at + block);
        if (mine.subarray(at, to).equals(theirs.subarray(at, to))) {
          if (run) yield run;
          run = null;
          continue;
        }
        const zero = isZero(mine, at, to);
        if (run && run.zero === zero) {
          run.length += to - at;
          if (!zero) run.data = mine.subarray(run.start - start, to);
          continue;
        }
        if (run) yield run;
        run = zero
          ? { start: start + at, length: to - at, zero }
          : { start: start + at, length: to - at, zero, data: mine.subarray(at, to) };
      }
      if (run) yield run;
    }
  }
}

/**
 * The union of the images' data extents within [0, size), widened to whole
 * blocks and merged: outside it, both read as zeros.
 */
function dataAreas(
  lists: readonly Extent[][],
  size: number,
  block: number,
): { start: number; end: number }[] {
  const areas = lists
    .flat()
    .filter((e) => !e.zero && e.start < size)
    .map((e) => ({
      start: Math.floor(e.start / block) * block,
      end: Math.min(size, Math.ceil((e.start + e.length) / block) * block),
    }))
    .sort((a, b) => a.start - b.start);
  const out: { start: number; end: number }[] = [];
  for (const a of areas) {
    const last = out[out.length - 1];
    if (last && a.start <= last.end) last.end = Math.max(last.end, a.end);
    else out.push({ ...a });
  }
  return out;
}
