/**
 * A vhd or qcow2 export's bytes as spans for a zero-copy send
 * (SerializedImage.spans, src/http/zero-copy.ts): the layout's pieces
 * (SerializedImage.pieces) turned into the disk's file spans where a piece is
 * a range of the disk (its holes as zero spans, never read from storage, as
 * in the stream path) and byte spans where the format makes the bytes
 * (headers, tables, VHD sector bitmaps, padding, footers), in stream order.
 *
 * In batches, each one native send (a thread that sends it all, see
 * native/sendfile.c): a batch ends once it has batchLimits.spans spans (a VHD block
 * is two: its bitmap and its data, so a batch carries GiBs of blocks) or once
 * it holds batchLimits.madeBytes of made bytes (qcow2 tables are made per
 * 64 KiB cluster: the bytes a batch holds stay bounded whatever the disk).
 * The pieces are asked for WINDOW_BYTES of stream at a time, as the batches
 * are taken, so a 2 TiB export never lays out all its metadata at once.
 */
import type { Extent, FileSpan } from '../image/block-image.js';
import { findExtent } from '../image/read-virtual.js';
import type { SendSpan, StreamPiece } from './types.js';

const WINDOW_BYTES = 8 * 1024 * 1024;

/** Where a batch ends (see above); a tuning knob, which tests lower to send small disks in many batches. */
export const batchLimits = { spans: 8192, madeBytes: 8 * 1024 * 1024 };

export function* formatSpans(
  pieces: (start: number, end: number) => StreamPiece[],
  extents: readonly Extent[],
  fileSpans: (offset: number, length: number) => FileSpan[],
  start: number,
  end: number,
): Generator<SendSpan[]> {
  let batch: SendSpan[] = [];
  let made = 0;
  const add = (s: SendSpan) => {
    const last = batch[batch.length - 1];
    if (last && !('bytes' in last) && !('bytes' in s) && last.fd === s.fd) {
      if (s.fd < 0 || last.position + last.length === s.position) {
        last.length += s.length;
        return;
      }
    }
    batch.push('bytes' in s ? s : { ...s });
  };
  for (let from = start; from < end; ) {
    const to = Math.min(end, from + WINDOW_BYTES);
    for (const piece of pieces(from, to)) {
      if (piece.length <= 0) continue;
      if (piece.bytes) {
        add({ bytes: piece.bytes });
        made += piece.bytes.length;
      } else {
        for (const s of diskSpans(extents, fileSpans, piece.offset, piece.offset + piece.length)) add(s);
      }
      if (batch.length >= batchLimits.spans || made >= batchLimits.madeBytes) {
        yield batch;
        batch = [];
        made = 0;
      }
    }
    from = to;
  }
  if (batch.length > 0) yield batch;
}

/** The spans of disk bytes [start, end): holes as zero spans (never read from storage), data where the image keeps it. */
export function diskSpans(
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
