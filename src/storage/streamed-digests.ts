/**
 * Block digests computed from a disk's bytes as they are written, so the
 * commit's writeBlockDigests need not read them back.
 *
 * Why: a streaming import writes its data past the page cache (O_DIRECT), so
 * reading it back to hash it at the commit read the whole disk from the
 * device again, after the upload, while the client waited: on the reference
 * VM that was half of a vhd or qcow2 import's time. The bytes are in memory
 * as they arrive; hashing them there costs the same CPU and no reads, and
 * it overlaps the network.
 *
 * A block is known only when its bytes were fed whole, in order, and nothing
 * was fed into part of it since; every other block is left to
 * writeBlockDigests, which reads and hashes it as before. Entries are the
 * ones writeBlockDigests writes: the first 16 bytes of the block's SHA-256,
 * 16 zero bytes for a block of zeros.
 */
import { createHash, type Hash } from 'node:crypto';
import { isZero } from '../image/zero.js';
import { DIGEST_BLOCK_BYTES, DIGEST_ENTRY_BYTES } from './block-digests.js';

/** Blocks per chunk of entries: 64 MiB of disk in 16 KiB. */
const CHUNK_BLOCKS = 1024;
/**
 * Chunks kept at most (16 MiB of entries: the digests of 64 GiB of data);
 * blocks past that are left to the commit, so memory stays bounded whatever
 * is uploaded.
 */
const MAX_CHUNKS = 1024;

interface Chunk {
  entries: Buffer;
  known: Uint8Array;
}

/** A block whose first bytes were fed, hashed so far up to `next`. */
interface Partial {
  block: number;
  next: number;
  hash: Hash;
  zero: boolean;
}

export class StreamedDigests {
  private readonly chunks = new Map<number, Chunk>();
  private partial: Partial | null = null;

  /** Digests of a disk of `virtualSize` bytes (its last block may be short). */
  constructor(readonly virtualSize: number) {}

  /**
   * Disk bytes [position, position + data.length) are now `data` (written
   * after every range fed before). Blocks it covers whole become known;
   * blocks it covers in part are forgotten, except one whose start it
   * holds: the next feed, when contiguous, completes it.
   */
  feed(data: Buffer, position: number): void {
    const end = Math.min(position + data.length, this.virtualSize);
    let pos = position;
    const partial = this.partial;
    this.partial = null;
    if (partial && partial.next === pos && pos < end) {
      const blockEnd = this.blockEnd(partial.block);
      const to = Math.min(end, blockEnd);
      const bytes = data.subarray(0, to - pos);
      partial.hash.update(bytes);
      partial.zero &&= isZero(bytes);
      if (to < blockEnd) {
        partial.next = to;
        this.partial = partial;
        return;
      }
      this.record(partial.block, partial.zero ? null : partial.hash.digest());
      pos = to;
    }
    while (pos < end) {
      const block = Math.floor(pos / DIGEST_BLOCK_BYTES);
      const blockEnd = this.blockEnd(block);
      const bytes = data.subarray(pos - position, Math.min(end, blockEnd) - position);
      if (pos !== block * DIGEST_BLOCK_BYTES) {
        this.forgetBlock(block);
      } else if (blockEnd <= end) {
        this.record(block, isZero(bytes) ? null : createHash('sha256').update(bytes).digest());
      } else {
        this.forgetBlock(block);
        this.partial = { block, next: end, hash: createHash('sha256').update(bytes), zero: isZero(bytes) };
      }
      pos += bytes.length;
    }
  }

  /** Disk bytes [start, end) changed otherwise than by a feed: the blocks they touch are no longer known. */
  forget(start: number, end: number): void {
    if (end <= start) return;
    const first = Math.floor(start / DIGEST_BLOCK_BYTES);
    const last = Math.ceil(Math.min(end, this.virtualSize) / DIGEST_BLOCK_BYTES);
    if (this.partial && this.partial.block >= first && this.partial.block < last) this.partial = null;
    for (const [index, chunk] of this.chunks) {
      const base = index * CHUNK_BLOCKS;
      const from = Math.max(first, base);
      const to = Math.min(last, base + CHUNK_BLOCKS);
      if (from < to) chunk.known.fill(0, from - base, to - base);
    }
  }

  /** Copies block's entry to out[at, at + DIGEST_ENTRY_BYTES); false when the block is not known. */
  entryInto(block: number, out: Buffer, at: number): boolean {
    const chunk = this.chunks.get(Math.floor(block / CHUNK_BLOCKS));
    const i = block % CHUNK_BLOCKS;
    if (!chunk?.known[i]) return false;
    chunk.entries.copy(out, at, i * DIGEST_ENTRY_BYTES, (i + 1) * DIGEST_ENTRY_BYTES);
    return true;
  }

  private blockEnd(block: number): number {
    return Math.min((block + 1) * DIGEST_BLOCK_BYTES, this.virtualSize);
  }

  /** `digest` null: a block of zeros. */
  private record(block: number, digest: Buffer | null): void {
    const index = Math.floor(block / CHUNK_BLOCKS);
    let chunk = this.chunks.get(index);
    if (!chunk) {
      if (this.chunks.size >= MAX_CHUNKS) return;
      chunk = {
        entries: Buffer.alloc(CHUNK_BLOCKS * DIGEST_ENTRY_BYTES),
        known: new Uint8Array(CHUNK_BLOCKS),
      };
      this.chunks.set(index, chunk);
    }
    const i = block % CHUNK_BLOCKS;
    const at = i * DIGEST_ENTRY_BYTES;
    if (digest) digest.copy(chunk.entries, at, 0, DIGEST_ENTRY_BYTES);
    else chunk.entries.fill(0, at, at + DIGEST_ENTRY_BYTES);
    chunk.known[i] = 1;
  }

  private forgetBlock(block: number): void {
    const chunk = this.chunks.get(Math.floor(block / CHUNK_BLOCKS));
    if (chunk) chunk.known[block % CHUNK_BLOCKS] = 0;
  }
}
