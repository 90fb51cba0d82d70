/**
 * The allocation map of a VDI's current content (ovirt-imageio's `extents`
 * shape): merged, ordered, covering [0, virtual_size) exactly once. Reads
 * metadata only (SEEK_DATA/SEEK_HOLE or the format's tables), never data.
 */
import type { ByteSpan, Extent } from '../image/block-image.js';
import type { VdiStore } from '../storage/vdis.js';

/** The VDI's extents, computed once per generation (VdiStore.images). */
export async function vdiExtents(vdis: VdiStore, vdiId: string): Promise<Extent[]> {
  const lease = await vdis.images.lease(vdiId);
  try {
    return await lease.extents();
  } finally {
    lease.release();
  }
}

export interface ZeroExtent extends Extent {
  /** The range is unallocated in the VDI's format (ovirt-imageio's `hole`). */
  hole: boolean;
}

/**
 * imageio's `context=zero` shape: each extent says whether it is a hole,
 * cut at the edges of the unallocated ranges (ordered) that its format
 * reports; only zero extents can be holes. Neighbours that agree merge.
 */
export function withHoles(extents: readonly Extent[], unallocated: readonly ByteSpan[]): ZeroExtent[] {
  const out: ZeroExtent[] = [];
  const push = (start: number, length: number, zero: boolean, hole: boolean) => {
    const last = out.at(-1);
    if (last && last.zero === zero && last.hole === hole && last.start + last.length === start) {
      last.length += length;
    } else out.push({ start, length, zero, hole });
  };
  let h = 0;
  for (const e of extents) {
    const end = e.start + e.length;
    if (!e.zero) {
      push(e.start, e.length, false, false);
      continue;
    }
    let at = e.start;
    while (at < end) {
      while (h < unallocated.length && unallocated[h].start + unallocated[h].length <= at) h++;
      const u = unallocated[h];
      if (!u || u.start >= end) {
        push(at, end - at, true, false);
        break;
      }
      if (u.start > at) {
        push(at, u.start - at, true, false);
        at = u.start;
      }
      const stop = Math.min(end, u.start + u.length);
      push(at, stop - at, true, true);
      at = stop;
    }
  }
  return out;
}

/** Extents (any shape) cut at `size`: what a ticket smaller than its VDI sees. */
export function cutAt<T extends { start: number; length: number }>(extents: readonly T[], size: number): T[] {
  const out: T[] = [];
  for (const e of extents) {
    if (e.start >= size) break;
    out.push(e.start + e.length > size ? { ...e, length: size - e.start } : e);
  }
  return out;
}
