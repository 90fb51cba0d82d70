/**
 * raw: the bytes of the virtual disk, nothing else. Holes are produced from a
 * shared zero buffer, never read from storage.
 */
import type { BlockImage, Extent, FileSpan } from '../../image/block-image.js';
import { RawFileImage } from '../../image/raw-file-image.js';
import { findExtent, readVirtual } from '../../image/read-virtual.js';
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
      ...(fileSpans && { spans: (start, end) => spansOf(extents, fileSpans, start, end) }),
    };
  },
  open: (path) => RawFileImage.open(path),
};

/** The spans of [start, end): holes as zero spans (never read from storage), data where the image keeps it. */
function spansOf(
  extents: readonly Extent[],
  fileSpans: (offset: number, length: number) => FileSpan[],
  start: number,
  end: number,
): FileSpan[] {
  const out: FileSpan[] = [];
  const add = (s: FileSpan) => {
    const last = out[out.length - 1];
    if (last && last.fd === s.fd && (s.fd < 0 || last.position + last.length === s.position))
      last.length += s.length;
    else out.push({ ...s });
  };
  for (let i = start < end ? findExtent(extents, start) : extents.length; i < extents.length; i++) {
    const e = extents[i];
    if (e.start >= end) break;
    const from = Math.max(start, e.start);
    const length = Math.min(end, e.start + e.length) - from;
    if (e.zero) add({ fd: -1, position: 0, length });
    else for (const s of fileSpans(from, length)) add(s);
  }
  return out;
}
