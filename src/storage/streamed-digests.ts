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
 * The hashing itself runs on the thread pool (the addon's sha256Blocks), a
 * batch of blocks at a time: on the event loop it was the largest part of an
 * import's CPU, and held up the receiving of the next bytes. The bytes fed
 * are kept (not copied) until their batch is hashed, so a caller must not
 * change them after feed(): uploads feed the chunks they received, which
 * nothing writes to. Without the addon, or with too many batches in flight
 * (memory stays bounded), a batch is hashed on the spot.
 *
 * A block is known only when its bytes were fed whole, in order, and nothing
 * was fed into part of it since; every other block is left to
 * writeBlockDigests, which reads and hashes it as before. Entries are the
 * ones writeBlockDigests writes: the first 16 bytes of the block's SHA-256,
 * 16 zero bytes for a block of zeros. settle() before reading them.
 */
import { createHash } from 'node:crypto';
import { addon } from '../image/native.js';
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
/** Blocks hashed per call to the thread pool (1 MiB): fewer calls, and the loop stays free. */
const BATCH_BLOCKS = 16;
/**
 * Batches hashing at once, at most; the bytes they hold are 1 MiB each (and
 * the socket buffers they lie in). A batch hashes in under a millisecond,
 * faster than an upload delivers one, so a few keep up.
 */
const MAX_BATCHES_IN_FLIGHT = 4;

interface Chunk {
  entries: Buffer;
  known: Uint8Array;
}

/** A block whose first bytes were fed, up to `next`. */
interface Partial {
  block: number;
  next: number;
  parts: Buffer[];
}

/** Blocks on their way to be hashed: their bytes, and the ticket each was queued with. */
interface Batch {
  blocks: number[];
  tickets: number[];
  parts: Buffer[];
  counts: number[];
}

const sha256Blocks = typeof addon?.sha256Blocks === 'function' ? addon.sha256Blocks : null;

export class StreamedDigests {
  private readonly chunks = new Map<number, Chunk>();
  private partial: Partial | null = null;
  private batch: Batch = emptyBatch();
  /** Block -> the ticket of its latest queued bytes; a result for any other ticket is stale. */
  private readonly queued = new Map<number, number>();
  private tickets = 0;
  private readonly inFlight = new Set<Promise<void>>();

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
      partial.parts.push(data.subarray(0, to - pos));
      if (to < blockEnd) {
        partial.next = to;
        this.partial = partial;
        return;
      }
      this.enqueue(partial.block, partial.parts);
      pos = to;
    }
    while (pos < end) {
      const block = Math.floor(pos / DIGEST_BLOCK_BYTES);
      const blockEnd = this.blockEnd(block);
      const bytes = data.subarray(pos - position, Math.min(end, blockEnd) - position);
      if (pos !== block * DIGEST_BLOCK_BYTES) {
        this.forgetBlock(block);
      } else if (blockEnd <= end) {
        this.enqueue(block, [bytes]);
      } else {
        this.forgetBlock(block);
        this.partial = { block, next: end, parts: [bytes] };
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
    for (const block of this.queued.keys()) if (block >= first && block < last) this.queued.delete(block);
    for (const [index, chunk] of this.chunks) {
      const base = index * CHUNK_BLOCKS;
      const from = Math.max(first, base);
      const to = Math.min(last, base + CHUNK_BLOCKS);
      if (from < to) chunk.known.fill(0, from - base, to - base);
    }
  }

  /** Hashes what is queued and waits for every hashing under way: entryInto then tells all it knows. */
  async settle(): Promise<void> {
    this.launch();
    while (this.inFlight.size > 0) await Promise.all(this.inFlight);
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

  /** The block's bytes are `parts`, in order: hashed with the next batch. */
  private enqueue(block: number, parts: Buffer[]): void {
    this.forgetBlock(block);
    const ticket = ++this.tickets;
    this.queued.set(block, ticket);
    const b = this.batch;
    b.blocks.push(block);
    b.tickets.push(ticket);
    b.parts.push(...parts);
    b.counts.push(parts.length);
    if (b.blocks.length >= BATCH_BLOCKS) this.launch();
  }

  private launch(): void {
    const b = this.batch;
    if (b.blocks.length === 0) return;
    this.batch = emptyBatch();
    if (!sha256Blocks || this.inFlight.size >= MAX_BATCHES_IN_FLIGHT) {
      this.settleBatch(b, hashHere(b));
      return;
    }
    const hashing = new Promise<void>((resolve) => {
      sha256Blocks(b.parts, b.counts, (err, entries) => {
        // A failure leaves the blocks unknown: the commit reads and hashes them.
        if (!err) this.settleBatch(b, entries);
        this.inFlight.delete(hashing);
        resolve();
      });
    });
    this.inFlight.add(hashing);
  }

  /** Records the batch's entries, but only for blocks whose bytes have not changed since it was queued. */
  private settleBatch(b: Batch, entries: Buffer): void {
    for (let i = 0; i < b.blocks.length; i++) {
      const block = b.blocks[i];
      if (this.queued.get(block) !== b.tickets[i]) continue;
      this.queued.delete(block);
      this.record(block, entries.subarray(i * DIGEST_ENTRY_BYTES, (i + 1) * DIGEST_ENTRY_BYTES));
    }
  }

  private record(block: number, entry: Buffer): void {
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
    entry.copy(chunk.entries, i * DIGEST_ENTRY_BYTES);
    chunk.known[i] = 1;
  }

  private forgetBlock(block: number): void {
    this.queued.delete(block);
    const chunk = this.chunks.get(Math.floor(block / CHUNK_BLOCKS));
    if (chunk) chunk.known[block % CHUNK_BLOCKS] = 0;
  }
}

function emptyBatch(): Batch {
  return { blocks: [], tickets: [], parts: [], counts: [] };
}

/** The batch's entries, hashed on the event loop (no addon, or enough hashing under way). */
function hashHere(b: Batch): Buffer {
  const entries = Buffer.alloc(b.blocks.length * DIGEST_ENTRY_BYTES);
  let part = 0;
  for (let i = 0; i < b.blocks.length; i++) {
    const parts = b.parts.slice(part, part + b.counts[i]);
    part += b.counts[i];
    if (parts.every((p) => isZero(p))) continue;
    const hash = createHash('sha256');
    for (const p of parts) hash.update(p);
    hash.digest().copy(entries, i * DIGEST_ENTRY_BYTES, 0, DIGEST_ENTRY_BYTES);
  }
  return entries;
}
