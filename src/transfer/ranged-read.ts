/**
 * The small ranged reads of an export (64 KiB GETs of qemu's HTTP driver,
 * nbdkit's curl plugin, backup agents): the bytes of one range filled into
 * one buffer from the layout's pieces (SerializedImage.pieces), with
 * positioned reads on the files where the image keeps its bytes as they are.
 * The stream path (readVirtual's generators, a source object, a plan) is
 * built for whole images and cost more than such a read's bytes.
 */
import { read as fsRead } from 'node:fs';
import type { StreamPiece } from '../formats/types.js';
import type { BlockImage } from '../image/block-image.js';
import type { Vdi } from '../storage/vdis.js';
import { exportEtag, FILE_EXTENSIONS, safeName } from './export.js';

/** The headers of an export that depend only on the VDI's row and the format. */
export interface ExportHeaders {
  etag: string;
  lastModified: string;
  disposition: string;
}

interface KeptHeaders extends ExportHeaders {
  generation: number;
  updated: string;
  name: string;
}

const MAX_KEPT_HEADERS = 1024;
const keptHeaders = new Map<string, KeptHeaders>();

/** As sendExport sets them (ETag, Last-Modified, Content-Disposition), kept while the row says the same. */
export function exportHeaders(vdi: Vdi, format: string): ExportHeaders {
  const key = `${vdi.id}.${format}`;
  const kept = keptHeaders.get(key);
  if (
    kept &&
    kept.generation === vdi.generation &&
    kept.updated === vdi.content_updated_at &&
    kept.name === vdi.name_label
  ) {
    return kept;
  }
  if (keptHeaders.size >= MAX_KEPT_HEADERS) keptHeaders.clear();
  const filename = `${safeName(vdi.name_label) || vdi.id}.${FILE_EXTENSIONS[format] ?? format}`;
  const made: KeptHeaders = {
    etag: exportEtag(vdi, format),
    lastModified: new Date(vdi.content_updated_at).toUTCString(),
    disposition: `attachment; filename="${filename}"`,
    generation: vdi.generation,
    updated: vdi.content_updated_at,
    name: vdi.name_label,
  };
  keptHeaders.set(key, made);
  return made;
}

/** Fills buf[at, at + length) from `fd` at `position`; past the file's end, zeros (as readAt). */
function readFully(
  fd: number,
  buf: Buffer,
  at: number,
  length: number,
  position: number,
  done: (err: Error | null) => void,
): void {
  fsRead(fd, buf, at, length, position, (err, n) => {
    if (err) return done(err);
    if (n === length) return done(null);
    if (n === 0) {
      buf.fill(0, at, at + length);
      return done(null);
    }
    readFully(fd, buf, at + n, length - n, position + n, done);
  });
}

/**
 * Fills `buf` with the pieces, in order (their lengths add up to buf's),
 * then calls `done` once. The image must stay open until then.
 */
export function fillPieces(
  image: BlockImage,
  pieces: readonly StreamPiece[],
  buf: Buffer,
  done: (err: Error | null) => void,
): void {
  let pending = 1;
  let failed: Error | null = null;
  const settle = (err: Error | null) => {
    if (err && !failed) failed = err;
    if (--pending === 0) done(failed);
  };
  let at = 0;
  try {
    for (const piece of pieces) {
      if (piece.bytes) {
        piece.bytes.copy(buf, at);
      } else if (image.fileSpans) {
        let into = at;
        for (const span of image.fileSpans(piece.offset, piece.length)) {
          if (span.fd < 0) buf.fill(0, into, into + span.length);
          else {
            pending++;
            readFully(span.fd, buf, into, span.length, span.position, settle);
          }
          into += span.length;
        }
        // fileSpans cut at the disk's end; the pieces never reach past it.
        if (into !== at + piece.length) buf.fill(0, into, at + piece.length);
      } else {
        pending++;
        image.readInto(buf.subarray(at, at + piece.length), piece.offset).then(() => settle(null), settle);
      }
      at += piece.length;
    }
  } catch (err) {
    failed ??= err as Error;
  }
  settle(null);
}
