/**
 * qcow2 wire format: import of version 2 and 3 images (./header.ts,
 * ./image.ts) and export of version 3 images with 64 KiB clusters
 * (./serialize.ts), after qemu's docs/interop/qcow2.txt.
 *
 * Hand-written because no maintained npm package reads or writes qcow2; the
 * spec sections each file implements are named atop it.
 */
import type { FormatCodec } from '../types.js';
import { Qcow2Image } from './image.js';
import { isOwnQcow2 } from './own-layout.js';
import { serializeQcow2 } from './serialize.js';
import { Qcow2StreamLayout } from './stream-layout.js';

export { MAX_VIRTUAL_SIZE_BYTES } from './header.js';
export { Qcow2Image } from './image.js';
export { computeLayout, EXPORT_CLUSTER_SIZE_BYTES, type Qcow2Layout } from './serialize.js';

export const qcow2Codec: FormatCodec = {
  name: 'qcow2',
  serialize: serializeQcow2,
  streamLayout: (fileSize, opts) => new Qcow2StreamLayout(fileSize, opts),
  open: (path, opts) => Qcow2Image.open(path, opts),
  isOwnLayout: isOwnQcow2,
};
