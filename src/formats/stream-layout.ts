/**
 * An image's layout learned while its bytes arrive in order: the part of a
 * codec that lets an import put plain data straight into the disk instead of
 * staging the whole image and converting it afterwards.
 *
 * A layout asks for metadata ranges one at a time (`need()`: a footer, a
 * header, a table, a bitmap), is handed their bytes once they have all
 * arrived (`learn()`), and in return announces data pieces: host ranges of
 * the image that hold guest bytes verbatim (`take()`). Anything it cannot
 * vouch for (compressed clusters, partial bitmaps, data that arrives before
 * its table) it simply does not announce; the caller stages those bytes and
 * the codec's ordinary `open()` converts them at the end. So a layout is an
 * optimisation that must only ever agree with `open()`: it reads the same
 * bytes with the same rules, and gives up (`disable()`) on anything odd,
 * leaving `open()` to say what is wrong.
 *
 * Memory stays bounded whatever the image claims: one need at a time of at
 * most MAX_NEED_BYTES, and at most MAX_PIECES announced pieces waiting.
 */
import { MinHeap } from './min-heap.js';

export type HostRange = [start: number, end: number];

/** Host bytes [host, host + length) of the image are guest bytes [guest, guest + length). */
export interface DataPiece {
  host: number;
  guest: number;
  length: number;
}

/** Largest metadata range a layout reads in one piece (a VHD BAT for 2 TiB is 4 MiB). */
export const MAX_NEED_BYTES = 16 * 1024 * 1024;
/** Pieces announced but not yet reached by the stream; beyond this, data is staged instead. */
const MAX_PIECES = 256 * 1024;

export abstract class StreamLayout {
  private readonly pieces = new MinHeap<DataPiece>((a, b) => a.host - b.host);
  private disabled = false;
  /** The piece the current learn() announced last: the next may extend it. */
  private lastAnnounced: DataPiece | null = null;
  /** Whether any piece was ever announced, so data may have been placed by this layout. */
  protected announcedAny = false;

  /** The metadata range to read next, or null when nothing more is needed. */
  need(): HostRange | null {
    return this.disabled ? null : this.nextNeed();
  }

  /** Hands over the bytes of the range `need()` returned; never throws. */
  learn(bytes: Buffer): void {
    if (this.disabled) return;
    try {
      this.learnNeed(bytes);
    } catch {
      // Whatever is wrong, open() will find and name it at finalize.
      this.disable();
    } finally {
      this.lastAnnounced = null;
    }
  }

  /** Removes and returns the parts of announced pieces inside host [start, end), in host order. */
  take(start: number, end: number): DataPiece[] {
    const out: DataPiece[] = [];
    for (let top = this.pieces.peek(); top && top.host < end; top = this.pieces.peek()) {
      this.pieces.pop();
      const pieceEnd = top.host + top.length;
      // Bytes before `start` arrived before the piece was known: they were staged.
      if (pieceEnd <= start) continue;
      const from = Math.max(top.host, start);
      const to = Math.min(pieceEnd, end);
      out.push({ host: from, guest: top.guest + (from - top.host), length: to - from });
      if (pieceEnd > end)
        this.pieces.push({ host: end, guest: top.guest + (end - top.host), length: pieceEnd - end });
    }
    return out;
  }

  /** Stops announcing anything; what was announced before stays true. */
  disable(): void {
    this.disabled = true;
    this.pieces.clear();
  }

  /**
   * Given the last 512 bytes of the complete file, and whether any announced
   * data may actually have been placed: throws when open() would read the
   * disk otherwise than the pieces announced (say, a format whose
   * authoritative header is at the end).
   */
  verifyEnd(_lastSector: Buffer, _placed: boolean): void {}

  protected abstract nextNeed(): HostRange | null;
  protected abstract learnNeed(bytes: Buffer): void;

  /** Announces a piece (within one learn(), merged with the previous one when it continues it). */
  protected announce(host: number, guest: number, length: number): void {
    if (length <= 0) return;
    this.announcedAny = true;
    const last = this.lastAnnounced;
    if (last && last.host + last.length === host && last.guest + last.length === guest) {
      last.length += length;
      return;
    }
    if (this.pieces.size >= MAX_PIECES) return;
    this.lastAnnounced = { host, guest, length };
    this.pieces.push(this.lastAnnounced);
  }
}

/** Checks that a range a layout is about to ask for is one it can afford. */
export function affordable(start: number, length: number): HostRange | null {
  if (!Number.isSafeInteger(start) || start < 0 || length <= 0 || length > MAX_NEED_BYTES) return null;
  return [start, start + length];
}
