/**
 * The one seam between transfers and storage: a random-access virtual disk.
 *
 * Exports serialize from a BlockImage, imports land in one, and every format
 * at rest (raw file, VHD, qcow2) implements it. `extents()` is what makes
 * everything sparse-aware: callers never read a region reported as zero.
 */
export interface Extent {
  /** Byte offset in the virtual disk. */
  start: number;
  length: number;
  /** True when the region reads as zeros and has no storage behind it. */
  zero: boolean;
}

export interface BlockImage {
  /** Size of the virtual disk in bytes. */
  readonly virtualSize: number;
  /** Reads `length` bytes at `offset`; holes read as zeros. Never past virtualSize. */
  read(offset: number, length: number): Promise<Buffer>;
  write(offset: number, data: Buffer): Promise<void>;
  /** Merged, ordered, covering [0, virtualSize) exactly once. */
  extents(): Promise<Extent[]>;
  /** Makes every completed write durable. */
  flush(): Promise<void>;
  close(): Promise<void>;
}

/** Merges adjacent extents of the same kind and drops empty ones. */
export function mergeExtents(extents: Iterable<Extent>): Extent[] {
  const out: Extent[] = [];
  for (const e of extents) {
    if (e.length <= 0) continue;
    const last = out[out.length - 1];
    if (last && last.zero === e.zero && last.start + last.length === e.start) {
      last.length += e.length;
    } else {
      out.push({ ...e });
    }
  }
  return out;
}

/** Bytes of data (non-zero extents) in an extent list. */
export function allocatedBytes(extents: readonly Extent[]): number {
  let n = 0;
  for (const e of extents) if (!e.zero) n += e.length;
  return n;
}
