/**
 * Per-generation block digests: what changed-block answers and delta exports
 * stand on, so they never read either disk's data.
 *
 * A generation's digest file holds, for every 64 KiB block of its disk, 16
 * bytes of SHA-256 of the block's bytes; a block that reads as zeros has an
 * entry of 16 zero bytes (a real digest is never that), written as a hole,
 * so a sparse disk's digest file is sparse too. Computed from the image to
 * be committed before its commit, reading only its data extents (cost in
 * proportion to the data), written and fsynced before the transaction that
 * names it, never changed after: a snapshot or clone shares its source's
 * file by naming it, as it shares the image.
 *
 * Two disks' blocks are the same iff their entries are: a block rewritten
 * with identical bytes is not changed, whatever the layers at rest are.
 */
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import type { DiffRun } from '../image/block-diff.js';
import type { BlockImage } from '../image/block-image.js';
import { readAt, writeFully } from '../image/file-io.js';
import { addon } from '../image/native.js';
import { forEachDataRun, isZero } from '../image/zero.js';
import type { StreamedDigests } from './streamed-digests.js';

export const DIGEST_BLOCK_BYTES = 64 * 1024;
export const DIGEST_ENTRY_BYTES = 16;
const ENTRY_BYTES = DIGEST_ENTRY_BYTES;
const MAGIC = 'DPBLKDG1';
const HEADER_BYTES = 64;
/** Blocks read (and hashed) per read of the image: 4 MiB. */
const READ_BLOCKS = 64;
/** Entries compared per read of two digest files: 1 MiB of each. */
const COMPARE_ENTRIES = 64 * 1024;
/** Entries compared at once before one by one: 4 KiB of each file, 16 MiB of disk. */
const COMPARE_GROUP_ENTRIES = 256;

export function blockCount(virtualSize: number): number {
  return Math.ceil(virtualSize / DIGEST_BLOCK_BYTES);
}

/**
 * Writes the digest file of `image` at `file` (replacing one left by an
 * earlier attempt) and fsyncs it. The caller fsyncs the directory. Blocks
 * `known` holds (hashed as they were written: streamed-digests.ts) are taken
 * from it, not read.
 */
export async function writeBlockDigests(
  image: BlockImage,
  file: string,
  signal?: AbortSignal,
  known?: StreamedDigests | null,
): Promise<void> {
  const size = image.virtualSize;
  const count = blockCount(size);
  const from = known?.virtualSize === size ? known : null;
  await from?.settle();
  const handle = await fsp.open(file, 'w', 0o600);
  try {
    const header = Buffer.alloc(HEADER_BYTES);
    header.write(MAGIC, 0, 'latin1');
    header.writeUInt32BE(DIGEST_BLOCK_BYTES, 8);
    header.writeUInt32BE(ENTRY_BYTES, 12);
    header.writeBigUInt64BE(BigInt(size), 16);
    header.writeBigUInt64BE(BigInt(count), 24);
    await handle.write(header, 0, HEADER_BYTES, 0);
    await handle.truncate(HEADER_BYTES + count * ENTRY_BYTES);
    const buf = Buffer.allocUnsafe(READ_BLOCKS * DIGEST_BLOCK_BYTES);
    const entries = Buffer.alloc(READ_BLOCKS * ENTRY_BYTES);
    for (const [first, end] of dataBlockRuns(await image.extents())) {
      for (let b = first; b < end; b += READ_BLOCKS) {
        signal?.throwIfAborted();
        const n = Math.min(READ_BLOCKS, end - b);
        entries.fill(0);
        // Blocks [b + i, b + j) not known: read and hashed together.
        for (let i = 0; i < n; ) {
          if (from?.entryInto(b + i, entries, i * ENTRY_BYTES)) {
            i++;
            continue;
          }
          let j = i + 1;
          while (j < n && !from?.entryInto(b + j, entries, j * ENTRY_BYTES)) j++;
          await hashBlocks(image, buf, entries, b, i, j);
          i = j + 1;
        }
        if (!isZero(entries, 0, n * ENTRY_BYTES))
          await handle.write(entries, 0, n * ENTRY_BYTES, HEADER_BYTES + b * ENTRY_BYTES);
      }
    }
    await handle.sync();
  } catch (err) {
    await handle.close().catch(() => {});
    await fsp.rm(file, { force: true });
    throw err;
  }
  await handle.close();
}

/** Reads blocks [b + i, b + j) of `image` into `buf` and puts their entries at entries[i..j). */
async function hashBlocks(
  image: BlockImage,
  buf: Buffer,
  entries: Buffer,
  b: number,
  i: number,
  j: number,
): Promise<void> {
  const data = await image.readInto(
    buf.subarray(0, (j - i) * DIGEST_BLOCK_BYTES),
    (b + i) * DIGEST_BLOCK_BYTES,
  );
  for (let k = i; k < j; k++) {
    const from = (k - i) * DIGEST_BLOCK_BYTES;
    blockEntryInto(
      data.subarray(from, Math.min(data.length, from + DIGEST_BLOCK_BYTES)),
      entries,
      k * ENTRY_BYTES,
    );
  }
}

/**
 * Puts the entry of one block's bytes (cut at the disk's end) at `at` of
 * `entries`: left as it is (zeros, filled by the caller) for a zero block.
 */
export function blockEntryInto(block: Buffer, entries: Buffer, at: number): void {
  if (block.length === 0 || isZero(block, 0, block.length)) return;
  createHash('sha256').update(block).digest().copy(entries, at, 0, ENTRY_BYTES);
}

const sha256Blocks = typeof addon?.sha256Blocks === 'function' ? addon.sha256Blocks : null;

/**
 * The entries of several blocks at once, each `blocks[i]` (a block's bytes,
 * cut at the disk's end) into `entries` at `at[i]`: hashed on the thread pool
 * when the addon is built (one job for all of them), else here, block by block.
 */
export async function blockEntriesInto(blocks: Buffer[], entries: Buffer, at: number[]): Promise<void> {
  if (blocks.length === 0) return;
  if (!sha256Blocks) {
    for (let i = 0; i < blocks.length; i++) blockEntryInto(blocks[i], entries, at[i]);
    return;
  }
  const hashed = await new Promise<Buffer>((resolve, reject) =>
    sha256Blocks(
      blocks,
      blocks.map(() => 1),
      (err, out) => (err ? reject(err) : resolve(out)),
    ),
  );
  for (let i = 0; i < blocks.length; i++) {
    hashed.copy(entries, at[i], i * ENTRY_BYTES, (i + 1) * ENTRY_BYTES);
  }
}

/**
 * The digests of a commit that changes some blocks of a content and keeps
 * the rest (a delta import): a copy of the content's digest file (its zero
 * pages left holes) whose entries are then changed one by one, fsynced by
 * finish(). The cost is the file's (16 bytes per 64 KiB of disk), never the
 * disk's, and its space follows the disk's data.
 */
export class DigestUpdate {
  private constructor(
    private readonly old: DigestReader,
    private readonly handle: fsp.FileHandle,
    private readonly file: string,
  ) {}

  /**
   * null when `from` is missing, not a digest file, or of another disk size
   * than `virtualSize` (nothing to start from).
   */
  static async create(from: string, to: string, virtualSize: number): Promise<DigestUpdate | null> {
    const old = await DigestReader.open(from);
    if (!old) return null;
    if (old.blocks !== blockCount(virtualSize)) {
      await old.close();
      return null;
    }
    let handle: fsp.FileHandle | null = null;
    try {
      handle = await fsp.open(to, 'w', 0o600);
      const src = await fsp.open(from, 'r');
      try {
        const { size } = await src.stat();
        await handle.truncate(size);
        const buf = Buffer.allocUnsafe(COMPARE_ENTRIES * ENTRY_BYTES);
        for (let at = 0; at < size; at += buf.length) {
          const got = await readAt(src, buf.subarray(0, Math.min(buf.length, size - at)), at);
          // Page by page: a 1 MiB read of entries spans 4 GiB of disk, and a
          // disk with data all over it has zero pages in every such read.
          const runs: [number, number][] = [];
          forEachDataRun(got, got.length, at, (s, e) => runs.push([s, e]));
          for (const [s, e] of runs) await writeFully(handle, got, s, e - s, at + s);
        }
      } finally {
        await src.close();
      }
      return new DigestUpdate(old, handle, to);
    } catch (err) {
      await handle?.close().catch(() => {});
      await old.close();
      await fsp.rm(to, { force: true });
      throw err;
    }
  }

  /** The content's entries [first, first + n) into `buf`, as they were before any set(). */
  entries(buf: Buffer, first: number, n: number): Promise<Buffer> {
    return this.old.read(buf, first, n);
  }

  /** Entries [first, first + n) become `entries`' first n. */
  async set(first: number, entries: Buffer, n: number): Promise<void> {
    await writeFully(this.handle, entries, 0, n * ENTRY_BYTES, HEADER_BYTES + first * ENTRY_BYTES);
  }

  /** Makes the new file durable and closes both. */
  async finish(): Promise<void> {
    try {
      await this.handle.sync();
    } finally {
      await this.close();
    }
  }

  /** Closes both and removes the new file (a failed commit). */
  async abort(): Promise<void> {
    await this.close();
    await fsp.rm(this.file, { force: true });
  }

  private async close(): Promise<void> {
    await this.handle.close().catch(() => {});
    await this.old.close().catch(() => {});
  }
}

/**
 * What diffBlocks tells, told by digests: the runs, in order, a layer over
 * a parent must define so that it reads as `next`, where `nextDigests` and
 * `parentDigests` are the two disks' digest files. Only the blocks whose
 * entries differ are read, and only from `next`: a whole-image import after
 * a snapshot reads none of the VDI's content. Null when either file is
 * missing or not of `next`'s size (the caller diffs the bytes instead).
 * Data runs are views valid until the generator resumes.
 */
export async function digestDiffRuns(
  next: BlockImage,
  nextDigests: string,
  parentDigests: string,
  signal?: AbortSignal,
): Promise<AsyncGenerator<DiffRun> | null> {
  const count = blockCount(next.virtualSize);
  const usable = async (file: string) => {
    const reader = await DigestReader.open(file);
    await reader?.close();
    return reader?.blocks === count;
  };
  if (!(await usable(nextDigests)) || !(await usable(parentDigests))) return null;
  return runsWhereDigestsDiffer(next, nextDigests, parentDigests, count, signal);
}

/** The files are opened by the generator itself, so one its caller never starts holds nothing open. */
async function* runsWhereDigestsDiffer(
  next: BlockImage,
  nextDigests: string,
  parentDigests: string,
  count: number,
  signal?: AbortSignal,
): AsyncGenerator<DiffRun> {
  const B = DIGEST_BLOCK_BYTES;
  const E = ENTRY_BYTES;
  const size = next.virtualSize;
  const entries = Buffer.alloc(READ_BLOCKS * E);
  const buf = Buffer.allocUnsafe(READ_BLOCKS * B);
  const [mine, theirs] = await Promise.all([
    DigestReader.open(nextDigests),
    DigestReader.open(parentDigests),
  ]);
  try {
    if (!mine || !theirs) throw new Error(`a digest file went away: ${nextDigests}, ${parentDigests}`);
    for await (const [first, end] of differingRuns(mine, theirs, count, signal)) {
      // Cut into runs all zero in `next` or all not, at most READ_BLOCKS long (`next`'s entries tell).
      for (let b = first; b < end; b += READ_BLOCKS) {
        signal?.throwIfAborted();
        const n = Math.min(READ_BLOCKS, end - b);
        await mine.read(entries, b, n);
        for (let i = 0; i < n; ) {
          const zero = isZero(entries, i * E, (i + 1) * E);
          let j = i + 1;
          while (j < n && isZero(entries, j * E, (j + 1) * E) === zero) j++;
          const start = (b + i) * B;
          const length = Math.min(size, (b + j) * B) - start;
          if (zero) yield { start, length, zero };
          else yield { start, length, zero, data: await next.readInto(buf.subarray(0, length), start) };
          i = j;
        }
      }
    }
  } finally {
    await Promise.all([mine?.close(), theirs?.close()]);
  }
}

/** Block index runs [first, end) overlapping the data extents, merged. */
function dataBlockRuns(
  extents: readonly { start: number; length: number; zero: boolean }[],
): [number, number][] {
  const runs: [number, number][] = [];
  for (const e of extents) {
    if (e.zero || e.length <= 0) continue;
    const first = Math.floor(e.start / DIGEST_BLOCK_BYTES);
    const end = Math.ceil((e.start + e.length) / DIGEST_BLOCK_BYTES);
    const last = runs[runs.length - 1];
    if (last && first <= last[1]) last[1] = Math.max(last[1], end);
    else runs.push([first, end]);
  }
  return runs;
}

/** One digest file opened for reading; entries past its disk's end read as zero blocks. */
class DigestReader {
  private constructor(
    private readonly handle: fsp.FileHandle,
    readonly blocks: number,
  ) {}

  /** null when the file is missing or not a digest file (then nothing can be told). */
  static async open(file: string): Promise<DigestReader | null> {
    let handle: fsp.FileHandle;
    try {
      handle = await fsp.open(file, 'r');
    } catch {
      return null;
    }
    const header = await readAt(handle, Buffer.alloc(HEADER_BYTES), 0).catch(() => Buffer.alloc(0));
    const ok =
      header.length === HEADER_BYTES &&
      header.toString('latin1', 0, 8) === MAGIC &&
      header.readUInt32BE(8) === DIGEST_BLOCK_BYTES &&
      header.readUInt32BE(12) === ENTRY_BYTES;
    if (!ok) {
      await handle.close();
      return null;
    }
    return new DigestReader(handle, Number(header.readBigUInt64BE(24)));
  }

  /** Entries [first, first + n) into `buf` (zeros past the end). */
  async read(buf: Buffer, first: number, n: number): Promise<Buffer> {
    const out = buf.subarray(0, n * ENTRY_BYTES);
    out.fill(0);
    const have = Math.max(0, Math.min(n, this.blocks - first));
    if (have > 0)
      await readAt(this.handle, out.subarray(0, have * ENTRY_BYTES), HEADER_BYTES + first * ENTRY_BYTES);
    return out;
  }

  close(): Promise<void> {
    return this.handle.close();
  }
}

/**
 * The 64 KiB blocks of [0, blocks) whose digests differ between the two
 * files, as sorted runs [first, end) of block indices; null when either file
 * is missing or unreadable (the caller answers "unknown", never a guess).
 */
export async function changedBlockRuns(
  fileA: string,
  fileB: string,
  blocks: number,
): Promise<[number, number][] | null> {
  if (fileA === fileB) return [];
  const [a, b] = await Promise.all([DigestReader.open(fileA), DigestReader.open(fileB)]);
  try {
    if (!a || !b) return null;
    const runs: [number, number][] = [];
    for await (const run of differingRuns(a, b, blocks)) runs.push(run);
    return runs;
  } finally {
    await a?.close();
    await b?.close();
  }
}

/**
 * The runs [first, end) of blocks of [0, blocks) whose entries differ
 * between `a` and `b`, in order, read a chunk of each file at a time.
 */
async function* differingRuns(
  a: DigestReader,
  b: DigestReader,
  blocks: number,
  signal?: AbortSignal,
): AsyncGenerator<[number, number]> {
  const bufA = Buffer.alloc(COMPARE_ENTRIES * ENTRY_BYTES);
  const bufB = Buffer.alloc(COMPARE_ENTRIES * ENTRY_BYTES);
  let run: [number, number] | null = null;
  for (let first = 0; first < blocks; first += COMPARE_ENTRIES) {
    signal?.throwIfAborted();
    const n = Math.min(COMPARE_ENTRIES, blocks - first);
    const [ea, eb] = await Promise.all([a.read(bufA, first, n), b.read(bufB, first, n)]);
    // Most of two digest files agree: a group's entries are compared at
    // once, and only a group that differs entry by entry.
    for (let g = 0; g < n; g += COMPARE_GROUP_ENTRIES) {
      const gEnd = Math.min(n, g + COMPARE_GROUP_ENTRIES);
      const [gs, ge] = [g * ENTRY_BYTES, gEnd * ENTRY_BYTES];
      if (ea.compare(eb, gs, ge, gs, ge) === 0) continue;
      for (let i = g; i < gEnd; i++) {
        const at = i * ENTRY_BYTES;
        if (ea.compare(eb, at, at + ENTRY_BYTES, at, at + ENTRY_BYTES) === 0) continue;
        const block = first + i;
        if (run && run[1] === block) run[1]++;
        else {
          if (run) yield run;
          run = [block, block + 1];
        }
      }
    }
  }
  if (run) yield run;
}
