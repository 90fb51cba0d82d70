/**
 * The allocation map of a VDI's current content (ovirt-imageio's `extents`
 * shape): merged, ordered, covering [0, virtual_size) exactly once. Reads
 * metadata only (SEEK_DATA/SEEK_HOLE or the format's tables), never data.
 */
import type { Extent } from '../storage/block-image.js';
import type { VdiStore } from '../storage/vdis.js';

export interface VdiExtents {
  generation: number;
  virtualSize: number;
  extents: Extent[];
}

export async function vdiExtents(vdis: VdiStore, vdiId: string): Promise<VdiExtents> {
  const vdi = vdis.get(vdiId);
  const image = await vdis.openImage(vdi);
  try {
    return { generation: vdi.generation, virtualSize: image.virtualSize, extents: await image.extents() };
  } finally {
    await image.close();
  }
}
