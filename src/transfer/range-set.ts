/**
 * A set of byte ranges, half-open [start, end), kept merged and ordered: what
 * a resumable upload has received. Chunks arrive in any order and may repeat.
 */
export type ByteRange = [start: number, end: number];

export class RangeSet {
  private ranges: ByteRange[];

  constructor(ranges: readonly ByteRange[] = []) {
    this.ranges = [];
    for (const [s, e] of ranges) this.add(s, e);
  }

  add(start: number, end: number): void {
    if (end <= start) return;
    const out: ByteRange[] = [];
    let [s, e] = [start, end];
    let placed = false;
    for (const r of this.ranges) {
      if (r[1] < s) out.push(r);
      else if (r[0] > e) {
        if (!placed) {
          out.push([s, e]);
          placed = true;
        }
        out.push(r);
      } else {
        s = Math.min(s, r[0]);
        e = Math.max(e, r[1]);
      }
    }
    if (!placed) out.push([s, e]);
    this.ranges = out;
  }

  /** Bytes received contiguously from 0: tus's Upload-Offset. */
  contiguousFromZero(): number {
    return this.ranges.length && this.ranges[0][0] === 0 ? this.ranges[0][1] : 0;
  }

  /** Total bytes covered. */
  size(): number {
    return this.ranges.reduce((n, [s, e]) => n + e - s, 0);
  }

  /** The parts of [start, end) not in the set. */
  missing(start: number, end: number): ByteRange[] {
    const out: ByteRange[] = [];
    let pos = start;
    for (const [s, e] of this.ranges) {
      if (e <= pos) continue;
      if (s >= end) break;
      if (s > pos) out.push([pos, Math.min(s, end)]);
      pos = Math.max(pos, e);
      if (pos >= end) break;
    }
    if (pos < end) out.push([pos, end]);
    return out;
  }

  covers(start: number, end: number): boolean {
    return this.missing(start, end).length === 0;
  }

  toJSON(): ByteRange[] {
    return this.ranges.map((r) => [r[0], r[1]]);
  }
}
