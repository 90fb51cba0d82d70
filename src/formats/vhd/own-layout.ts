/**
 * Whether a VHD file is byte for byte what ./serialize.ts writes for the
 * disk it holds, outside that disk's data (see ../own-layout.ts): the footer
 * copy, dynamic header and BAT, every block's sector bitmap, the footer, and
 * the file's length.
 */
import type { BlockImage } from '../../image/block-image.js';
import { FileComparison } from '../own-layout.js';
import { BITMAP_ALL_SET, BLOCK_STRIDE_BYTES, layoutVhd, type VhdLayout } from './serialize.js';

/** Bitmaps read at once. */
const BITMAP_READS_IN_FLIGHT = 32;

export async function isOwnVhd(image: BlockImage, path: string): Promise<boolean> {
  let layout: VhdLayout;
  try {
    layout = layoutVhd(image.virtualSize, await image.extents());
  } catch {
    return false; // a disk the serializer would not write as VHD at all
  }
  const file = await FileComparison.open(path);
  try {
    const { size, head, footer, dataStart, blocks } = layout;
    if (file.size !== size) return false;
    if (!(await file.holds(0, head)) || !(await file.holds(size - footer.length, footer))) return false;
    for (let k = 0; k < blocks.length; k += BITMAP_READS_IN_FLIGHT) {
      const reads: Promise<boolean>[] = [];
      for (let i = k; i < Math.min(blocks.length, k + BITMAP_READS_IN_FLIGHT); i++) {
        reads.push(file.holds(dataStart + i * BLOCK_STRIDE_BYTES, BITMAP_ALL_SET));
      }
      if (!(await Promise.all(reads)).every(Boolean)) return false;
    }
    return true;
  } finally {
    await file.close();
  }
}
