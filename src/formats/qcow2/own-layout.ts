/**
 * Whether a qcow2 file is byte for byte what ./serialize.ts writes for the
 * disk it holds, outside that disk's data (see ../own-layout.ts): header,
 * refcount table and blocks, L1 and L2 tables, and the file's length.
 */
import type { BlockImage } from '../../image/block-image.js';
import { FileComparison } from '../own-layout.js';
import { serializeQcow2 } from './serialize.js';

export async function isOwnQcow2(image: BlockImage, path: string): Promise<boolean> {
  const serialized = await serializeQcow2(image);
  const file = await FileComparison.open(path);
  try {
    if (file.size !== serialized.size) return false;
    return await file.holdsStream(0, serialized.read(0, serialized.metadataBytes));
  } finally {
    await file.close();
  }
}
