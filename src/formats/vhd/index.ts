/**
 * The VHD wire format (Microsoft "Virtual Hard Disk Image Format
 * Specification": Hard Disk Footer Format, Dynamic Disk Header Format, Block
 * Allocation Table and Data Blocks with the sector bitmap, Appendix: CHS
 * Calculation).
 *
 * Import opens fixed and dynamic images read-only (image.ts); export writes a
 * dynamic image with 2 MiB blocks (serialize.ts). Hand-written because no
 * maintained npm library reads or writes VHD; see format.ts.
 */
import type { FormatCodec } from '../types.js';
import { openVhd } from './image.js';
import { isOwnVhd } from './own-layout.js';
import { serializeVhd } from './serialize.js';
import { VhdStreamLayout } from './stream-layout.js';

export { MAX_VIRTUAL_SIZE_BYTES as VHD_MAX_VIRTUAL_SIZE_BYTES } from './format.js';
export { EXPORT_BLOCK_SIZE_BYTES, layoutVhd } from './serialize.js';

export const vhdCodec: FormatCodec = {
  name: 'vhd',
  serialize: serializeVhd,
  streamLayout: (fileSize) => new VhdStreamLayout(fileSize),
  open: openVhd,
  isOwnLayout: isOwnVhd,
};
