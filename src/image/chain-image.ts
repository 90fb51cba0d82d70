/**
 * A disk read through a chain of layers (docs/design.md, "Chains at rest"):
 * each layer defines some ranges of the disk, and a byte reads from the
 * top-most layer that defines it, or as zero when none does. A range a layer
 * defines reads as that layer's bytes even where they are zeros (zeros
 * written over a parent's data).
 *
 * From the layers' definitions alone (metadata, no data) the chain builds
 * one resolved map once: sorted runs, each naming the layer that serves it.
 * A read is then a binary search and one read per run, whatever the depth,
 * so a deep chain reads like a flat disk. Extents are the runs, each cut by
 * the extents of the layer serving it.
 */
import {
  type BlockImage,
  type Extent,
  type FileSpan,
  mergeExtents,
  readByInto,
  readLength,
} from './block-image.js';

export interface DefinedRange {
  start: number;
  length: number;
}

/** One layer of a chain: its own image, and the ranges of the disk it defines. */
export interface ChainLayer {
  image: BlockImage;
  /**
   * Sorted, non-overlapping ranges this layer defines; the rest reads through
   * to the layer below. A base layer defines all of its disk.
   */
  defined: readonly DefinedRange[];
}

/** A run of the resolved map: [start, start + length) served by `layer` (an index, top first), or zeros (-1). */
interface Run {
  start: number;
  length: number;
  layer: number;
}

export class ChainImage implements BlockImage {
  private readonly runs: Run[];
  private layerExtents: Promise<Extent[][]> | null = null;
  private closed = false;

  /** `layers` top first, base last; the chain owns them (close() closes them). */
  constructor(
    readonly virtualSize: number,
    private readonly layers: readonly ChainLayer[],
  ) {
    if (!Number.isSafeInteger(virtualSize) || virtualSize < 0) {
      throw new RangeError(`invalid virtual size ${virtualSize}`);
    }
    this.runs = resolve(virtualSize, layers);
    if (layers.every((l) => l.image.fileSpans)) this.fileSpans = (o, n) => this.spansOf(o, n);
  }

  /** How many layers the chain reads through. */
  get depth(): number {
    return this.layers.length;
  }

  read(offset: number, length: number): Promise<Buffer> {
    return readByInto(this, offset, length);
  }

  async readInto(buf: Buffer, offset: number): Promise<Buffer> {
    const n = readLength(this.virtualSize, offset, buf.length);
    this.assertOpen();
    const reads: Promise<unknown>[] = [];
    for (let i = this.runAt(offset), pos = offset; pos < offset + n; i++) {
      const run = this.runs[i];
      const end = Math.min(run.start + run.length, offset + n);
      const piece = buf.subarray(pos - offset, end - offset);
      if (run.layer < 0) piece.fill(0);
      else reads.push(this.layers[run.layer].image.readInto(piece, pos));
      pos = end;
    }
    await Promise.all(reads);
    return buf.subarray(0, n);
  }

  /** Each run's bytes where its layer keeps them: only when every layer keeps its bytes in a file. */
  readonly fileSpans?: (offset: number, length: number) => FileSpan[];

  private spansOf(offset: number, length: number): FileSpan[] {
    const n = readLength(this.virtualSize, offset, length);
    this.assertOpen();
    const out: FileSpan[] = [];
    for (let i = this.runAt(offset), pos = offset; pos < offset + n; i++) {
      const run = this.runs[i];
      const end = Math.min(run.start + run.length, offset + n);
      if (run.layer < 0) {
        out.push({ fd: -1, position: 0, length: end - pos });
      } else {
        const spans = this.layers[run.layer].image.fileSpans?.(pos, end - pos) ?? [];
        out.push(...spans);
      }
      pos = end;
    }
    return out;
  }

  async extents(): Promise<Extent[]> {
    this.assertOpen();
    this.layerExtents ??= Promise.all(this.layers.map((l) => l.image.extents()));
    const perLayer = await this.layerExtents;
    const out: Extent[] = [];
    for (const run of this.runs) {
      if (run.layer < 0) {
        out.push({ start: run.start, length: run.length, zero: true });
        continue;
      }
      const extents = perLayer[run.layer];
      const end = run.start + run.length;
      for (let k = extentAt(extents, run.start); k < extents.length && extents[k].start < end; k++) {
        const e = extents[k];
        const start = Math.max(e.start, run.start);
        out.push({ start, length: Math.min(e.start + e.length, end) - start, zero: e.zero });
      }
    }
    return mergeExtents(out);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.all(this.layers.map((l) => l.image.close()));
  }

  /** The index of the run holding `offset` (< virtualSize). */
  private runAt(offset: number): number {
    let lo = 0;
    let hi = this.runs.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.runs[mid].start <= offset) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }

  private assertOpen(): void {
    if (this.closed) throw new Error('chain image is closed');
  }
}

/**
 * The resolved map: what the top layer defines is its; what it leaves goes to
 * the next layer down, and so on; what no layer defines reads as zeros. A
 * layer never serves past its own image's end (a parent smaller than a grown
 * disk reads as zeros beyond it).
 */
function resolve(size: number, layers: readonly ChainLayer[]): Run[] {
  const runs: Run[] = [];
  let open: DefinedRange[] = size > 0 ? [{ start: 0, length: size }] : [];
  layers.forEach((layer, index) => {
    const limit = Math.min(size, layer.image.virtualSize);
    const left: DefinedRange[] = [];
    let d = 0;
    for (const gap of open) {
      let pos = gap.start;
      const end = gap.start + gap.length;
      while (d < layer.defined.length && layer.defined[d].start + layer.defined[d].length <= pos) d++;
      for (let k = d; k < layer.defined.length && layer.defined[k].start < end && pos < end; k++) {
        const def = layer.defined[k];
        const from = Math.max(pos, def.start);
        const to = Math.min(end, def.start + def.length, limit);
        if (to <= from) continue;
        if (from > pos) left.push({ start: pos, length: from - pos });
        runs.push({ start: from, length: to - from, layer: index });
        pos = to;
      }
      if (pos < end) left.push({ start: pos, length: end - pos });
    }
    open = left;
  });
  for (const gap of open) runs.push({ ...gap, layer: -1 });
  runs.sort((a, b) => a.start - b.start);
  return runs;
}

/** The index of the first extent ending after `offset`. */
function extentAt(extents: readonly Extent[], offset: number): number {
  let lo = 0;
  let hi = extents.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (extents[mid].start + extents[mid].length <= offset) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}
