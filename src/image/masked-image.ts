/**
 * A disk restricted to some of its ranges: inside them it reads as the disk
 * and reports data (zeros included: a range of zeros the disk changed to is
 * still part of what is kept), outside them it reads as zeros and reports
 * holes. What a delta export serializes: the changed blocks as the image's
 * own, everything else left to the parent the export names.
 */
import { type BlockImage, type Extent, type FileSpan, readByInto, readLength } from './block-image.js';

export interface Range {
  start: number;
  length: number;
}

export class MaskedImage implements BlockImage {
  private readonly ranges: Range[];

  /** `ranges` sorted and non-overlapping; cut to the disk. The mask does not own `image`. */
  constructor(
    private readonly image: BlockImage,
    ranges: readonly Range[],
  ) {
    const size = image.virtualSize;
    this.ranges = [];
    for (const r of ranges) {
      const start = Math.min(r.start, size);
      const end = Math.min(r.start + r.length, size);
      const last = this.ranges[this.ranges.length - 1];
      if (end <= start) continue;
      if (last && last.start + last.length >= start) last.length = Math.max(last.length, end - last.start);
      else this.ranges.push({ start, length: end - start });
    }
    const fileSpans = image.fileSpans?.bind(image);
    if (fileSpans) this.fileSpans = (offset, length) => this.spansOf(fileSpans, offset, length);
  }

  /** Only where the disk keeps its bytes in files: its spans inside the ranges, zero spans outside. */
  readonly fileSpans?: (offset: number, length: number) => FileSpan[];

  private spansOf(
    fileSpans: (offset: number, length: number) => FileSpan[],
    offset: number,
    length: number,
  ): FileSpan[] {
    const end = offset + readLength(this.virtualSize, offset, length);
    const out: FileSpan[] = [];
    let pos = offset;
    for (let i = this.firstEndingAfter(offset); i < this.ranges.length && pos < end; i++) {
      const r = this.ranges[i];
      if (r.start >= end) break;
      const from = Math.max(r.start, pos);
      const to = Math.min(r.start + r.length, end);
      if (from > pos) out.push({ fd: -1, position: 0, length: from - pos });
      out.push(...fileSpans(from, to - from));
      pos = to;
    }
    if (pos < end) out.push({ fd: -1, position: 0, length: end - pos });
    return out;
  }

  /** Index of the first range ending after `offset`: reads come by the thousand, ranges too. */
  private firstEndingAfter(offset: number): number {
    let lo = 0;
    let hi = this.ranges.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.ranges[mid].start + this.ranges[mid].length <= offset) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  get virtualSize(): number {
    return this.image.virtualSize;
  }

  /** Bytes the mask keeps. */
  get keptBytes(): number {
    return this.ranges.reduce((n, r) => n + r.length, 0);
  }

  read(offset: number, length: number): Promise<Buffer> {
    return readByInto(this, offset, length);
  }

  async readInto(buf: Buffer, offset: number): Promise<Buffer> {
    const n = readLength(this.virtualSize, offset, buf.length);
    const out = buf.subarray(0, n);
    out.fill(0);
    const end = offset + n;
    for (const r of this.ranges.slice(this.firstEndingAfter(offset))) {
      const from = Math.max(r.start, offset);
      const to = Math.min(r.start + r.length, end);
      if (r.start >= end) break;
      if (to > from) await this.image.readInto(out.subarray(from - offset, to - offset), from);
    }
    return out;
  }

  async extents(): Promise<Extent[]> {
    const out: Extent[] = [];
    let pos = 0;
    for (const r of this.ranges) {
      if (r.start > pos) out.push({ start: pos, length: r.start - pos, zero: true });
      out.push({ start: r.start, length: r.length, zero: false });
      pos = r.start + r.length;
    }
    if (pos < this.virtualSize) out.push({ start: pos, length: this.virtualSize - pos, zero: true });
    return out;
  }

  async close(): Promise<void> {}
}
