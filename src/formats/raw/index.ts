/**
 * raw: the bytes of the virtual disk, nothing else. Holes are produced from a
 * shared zero buffer, never read from storage.
 */
import type { BlockImage } from '../../image/block-image.js';
import { RawFileImage } from '../../image/raw-file-image.js';
import { readVirtual } from '../../image/read-virtual.js';
import { diskSpans } from '../send-spans.js';
import type { FormatCodec, SerializedImage } from '../types.js';

export const rawCodec: FormatCodec = {
  name: 'raw',
  async serialize(image: BlockImage): Promise<SerializedImage> {
    const extents = await image.extents();
    const fileSpans = image.fileSpans?.bind(image);
    return {
      size: image.virtualSize,
      read: (start, end) => readVirtual(image, extents, start, end),
      pieces: (start, end) => [{ offset: start, length: end - start }],
      ...(fileSpans && { spans: (start, end) => [diskSpans(extents, fileSpans, start, end)] }),
    };
  },
  open: (path) => RawFileImage.open(path),
};
