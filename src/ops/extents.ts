/**
 * The allocation map of a VDI's current content (ovirt-imageio's `extents`
 * shape): merged, ordered, covering [0, virtual_size) exactly once. Reads
 * metadata only (SEEK_DATA/SEEK_HOLE or the format's tables), never data.
 */
import type { BlockImage, Extent } from '../image/block-image.js';
import type { Vdi, VdiStore } from '../storage/vdis.js';

const OPEN_ATTEMPTS = 3;

/**
 * Opens the VDI's current generation. A commit between reading the row and
 * opening the file removes that generation's file (ENOENT): read the row
 * again and open the new one. The handle keeps its generation readable.
 */
export async function openCurrentImage(
  vdis: VdiStore,
  vdiId: string,
): Promise<{ vdi: Vdi; image: BlockImage }> {
  for (let attempt = 1; ; attempt++) {
    const vdi = vdis.get(vdiId);
    try {
      return { vdi, image: await vdis.openImage(vdi) };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT' || attempt >= OPEN_ATTEMPTS) throw err;
    }
  }
}

/** The VDI's extents, computed once per generation (VdiStore.images). */
export async function vdiExtents(vdis: VdiStore, vdiId: string): Promise<Extent[]> {
  const lease = await vdis.images.lease(vdiId);
  try {
    return await lease.extents();
  } finally {
    lease.release();
  }
}
