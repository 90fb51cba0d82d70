/**
 * The allocation map of a VDI's current content (ovirt-imageio's `extents`
 * shape): merged, ordered, covering [0, virtual_size) exactly once. Reads
 * metadata only (SEEK_DATA/SEEK_HOLE or the format's tables), never data.
 */
import type { Extent } from '../image/block-image.js';
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
