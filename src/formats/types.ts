/**
 * What every wire format provides. Codecs are pure: a BlockImage or file in,
 * bytes and extents out; they know nothing of HTTP, tasks or logging.
 */
import type { BlockImage, FileSpan } from '../image/block-image.js';
import type { DefinedRange } from '../image/chain-image.js';
import type { StreamLayout } from './stream-layout.js';

export type WireFormat = 'raw' | 'vhd' | 'qcow2';
export const WIRE_FORMATS: readonly WireFormat[] = ['raw', 'vhd', 'qcow2'];

/**
 * A format's byte stream of one image, laid out up front from the extents so
 * its exact size is known before the first byte and any range can be produced
 * without producing the bytes before it.
 */
export interface SerializedImage {
  /** Exact length of the stream in bytes. */
  readonly size: number;
  /** Yields the bytes of [start, end) in order; the chunks concatenate to exactly end - start bytes. */
  read(start: number, end: number): AsyncIterable<Buffer>;
  /**
   * Only where the disk's bytes lie in files as they are (a raw file or a
   * chain of them): the stream's bytes [start, end) as spans for a zero-copy
   * send, in batches (each one native send; see send-spans.ts): the disk's
   * file spans, holes as zero spans, and the bytes the format makes between
   * them. Made as the batches are taken; valid while the image is open.
   */
  spans?(start: number, end: number): Iterable<SendSpan[]>;
  /**
   * The stream's bytes [start, end) as pieces, in order, from the layout
   * alone: bytes the format makes (headers, tables, bitmaps, padding) and
   * ranges of the disk to read. What a small ranged read fills one buffer
   * from, without a generator per request.
   */
  pieces?(start: number, end: number): StreamPiece[];
}

/** Part of a body sent with sendfile: file bytes (fd >= 0), zeros (fd -1), or bytes the format makes. */
export type SendSpan = FileSpan | { bytes: Buffer };

/** A piece of a stream: `bytes` as they are, or else `length` bytes of the disk at `offset`. */
export interface StreamPiece {
  offset: number;
  length: number;
  bytes?: Buffer;
}

/**
 * How an export names itself and what it stands on. With `parent`, the
 * export is a differencing image (VHD: disk type 4 with the parent's UUID and
 * locators; qcow2: an overlay naming its backing file): what `image` reports
 * as data is the image's own, the rest reads through to the parent.
 */
export interface SerializeOptions {
  /** VHD: the image's unique id (16 bytes); derived from its layout when absent. */
  uuid?: Buffer;
  parent?: {
    /** The parent file's name as the child names it (relative: beside the child). */
    fileName: string;
    /** VHD: the parent's unique id (16 bytes). */
    uuid?: Buffer;
  };
}

/** How a codec opens a file. */
export interface OpenOptions {
  /**
   * Accept a differencing image (a VHD of disk type 4, a qcow2 naming a
   * backing file): it opens as a DifferencingImage. Without it, such an
   * image is refused (422), since what it does not hold is not in the file.
   */
  differencing?: boolean;
}

/**
 * A differencing image opened on its own: it reads its own blocks (the rest
 * as zeros) and says which ranges are its own; everything else belongs to
 * the parent it names, which the caller supplies (see image/chain-image.ts).
 */
export interface DifferencingImage extends BlockImage {
  readonly parent: {
    /** qcow2: the backing file name in the header; VHD: the parent's name, if recorded. */
    fileName?: string;
    /** VHD: the parent's unique id, as 32 hex digits. */
    uuid?: string;
  };
  /**
   * The ranges the image itself defines (its data, and zeros it writes over
   * the parent), sorted and merged; from metadata only.
   */
  defined(): Promise<DefinedRange[]>;
}

export function isDifferencing(image: BlockImage): image is DifferencingImage {
  const d = image as Partial<DifferencingImage>;
  return d.parent !== undefined && typeof d.defined === 'function';
}

export interface FormatCodec {
  readonly name: WireFormat;
  /** Lays out the export of `image` in this format (reads metadata only). */
  serialize(image: BlockImage, opts?: SerializeOptions): Promise<SerializedImage>;
  /**
   * Opens a file holding an image of this format as a random-access disk to
   * read, validating its metadata. Throws MalformedImageError /
   * UnsupportedImageError. (An image at rest changes by a new generation
   * written whole, never in place.)
   */
  open(path: string, opts?: OpenOptions): Promise<BlockImage>;
  /**
   * Whether the file at `path`, opened as `image`, is exactly what
   * `serialize(image)` writes (its bytes outside the disk's data compared;
   * only those are read). Such a file can stay at rest as it is; any other
   * is rewritten by `serialize`. Formats without it are always rewritten.
   */
  isOwnLayout?(image: BlockImage, path: string): Promise<boolean>;
  /**
   * A fresh layout reader for an upload of this format arriving in order
   * (`fileSize`: its length, when known before its bytes). Formats without
   * one are staged whole and converted at the end. `differencing`: an
   * image naming a parent (a delta) streams too (its own blocks).
   */
  streamLayout?(fileSize: number | null, opts?: { differencing?: boolean }): StreamLayout;
}
