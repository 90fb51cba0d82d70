/**
 * ovirt-imageio's dirty extents: the blocks changed since a snapshot
 * (changed-blocks.ts), each also saying whether it reads as zeros, so an
 * incremental backup writes zeros there without downloading them.
 */
import type { Extent } from '../image/block-image.js';
import type { VdiStore } from '../storage/vdis.js';
import { changedBlocks, dirtyExtents } from './changed-blocks.js';
import { vdiExtents } from './extents.js';

export interface DirtyExtent {
  start: number;
  length: number;
  dirty: boolean;
  zero: boolean;
}

/** Cuts the dirty extents at the zero extents' edges; neighbours that agree on both flags merge. */
export function withZero(
  dirty: readonly { start: number; length: number; dirty: boolean }[],
  zeros: readonly Extent[],
): DirtyExtent[] {
  const out: DirtyExtent[] = [];
  let z = 0;
  for (const d of dirty) {
    let at = d.start;
    const end = d.start + d.length;
    while (at < end) {
      while (z < zeros.length && zeros[z].start + zeros[z].length <= at) z++;
      const ze = zeros[z];
      const stop = ze ? Math.min(end, ze.start + ze.length) : end;
      const zero = ze ? ze.zero : false;
      const last = out.at(-1);
      if (last && last.dirty === d.dirty && last.zero === zero && last.start + last.length === at) {
        last.length += stop - at;
      } else out.push({ start: at, length: stop - at, dirty: d.dirty, zero });
      at = stop;
    }
  }
  return out;
}

/** The VDI's changes since snapshot `since`, in imageio's `context=dirty` shape. */
export async function imageioDirtyExtents(
  vdis: VdiStore,
  vdiId: string,
  since: string,
): Promise<DirtyExtent[]> {
  const { vdi, runs } = await changedBlocks(vdis, vdiId, since);
  const zeros = await vdiExtents(vdis, vdi.id);
  return withZero(dirtyExtents(vdi.virtual_size, runs), zeros);
}
