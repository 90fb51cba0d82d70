/**
 * Converts a vhd or qcow2 upload into its raw VDI while the bytes arrive.
 *
 * Why: landing the whole image in a staging file and converting it at
 * finalize wrote every byte twice and read it once more; on a 2 GiB image
 * the finalize alone took longer than the upload.
 *
 * How: the format's StreamLayout reads the image's metadata as it streams in
 * and announces where plain data goes in the disk. The writer that holds the
 * in-order stream (the "frontier": every byte before it has arrived) sends
 * each byte to exactly one place:
 * - metadata, and anything the layout cannot vouch for, to the staging file,
 *   at its offset in the image, as every upload did before;
 * - announced data to the new disk file (`dest`), at its guest offset.
 * Out-of-order chunks, and anything after a layout gives up, are staged.
 *
 * At finalize the codec opens the staged image as before, so every check of
 * the metadata still runs on the very bytes the layout read. The staged image
 * reads as zeros wherever data went to `dest` (those bytes were never written
 * to staging), so copying its non-zero data into `dest` completes the disk
 * and can never overwrite what streamed there.
 *
 * Durability is the staging file's: `sync()` makes `dest` durable together
 * with it before received ranges are recorded, and after a restart the
 * layout is learned again from the staged metadata up to what was recorded.
 * What streamed before a restart, or during a write whose bytes were then
 * not recorded, is no longer known exactly; finalize then overlays the
 * staged bytes on `dest` byte by byte instead of copying whole blocks.
 */
import { constants, promises as fsp } from 'node:fs';
import path from 'node:path';
import { codecFor } from '../formats/index.js';
import type { StreamLayout } from '../formats/stream-layout.js';
import type { BlockImage } from '../image/block-image.js';
import { DirectWriter } from '../image/direct-writer.js';
import { PRIVATE_FILE_MODE, readAt, writeFully } from '../image/file-io.js';
import { readVirtual } from '../image/read-virtual.js';
import { guarded, spaceGuardOf } from '../image/space.js';
import { zeroRange } from '../image/sparse.js';
import { forEachRun } from '../image/zero.js';
import { type CopyProgress, EarlyWriteback, writeRawData } from '../storage/convert.js';
import { StreamedDigests } from '../storage/streamed-digests.js';
import { fsyncDir } from '../storage/vdis.js';
import type { ByteRange, RangeSet } from './range-set.js';

/** Writes buf[0, length) to staging at image offset `at` (the landing's ordinary write). */
export type StageWrite = (buf: Buffer, length: number, at: number) => Promise<void>;

export interface RouteOptions {
  /** The parts of image range [start, end) not yet received; default: all. */
  writable?: (start: number, end: number) => ByteRange[];
  /** Zero runs must be written as zeros (a resumed upload may have left bytes there). */
  punchZeros: boolean;
}

/**
 * The disk being built for an upload's staging file. A reset starts a new
 * epoch, so a crash around it can never mix the old disk with the new upload.
 */
export function streamingDestPath(stagingPath: string, epoch = 0): string {
  return `${stagingPath}.raw${epoch ? `.${epoch}` : ''}`;
}

/** Beyond this many separate streamed pieces, the rest of an upload is staged (memory stays bounded). */
const MAX_SUNK_RANGES = 1024 * 1024;

/**
 * Guest ranges streamed into `dest`, appended as they are written (mostly in
 * order, so most appends extend the last range), sorted and merged once at
 * finalize, then walked in order.
 */
class SunkRanges {
  private starts: number[] = [];
  private ends: number[] = [];

  get count(): number {
    return this.starts.length;
  }

  add(start: number, end: number): void {
    const last = this.starts.length - 1;
    if (last >= 0 && this.ends[last] === start) this.ends[last] = end;
    else {
      this.starts.push(start);
      this.ends.push(end);
    }
  }

  /**
   * The parts of [start, end) not streamed, for calls in ascending order of
   * `start` (extents, as writeRawData visits them).
   */
  complement(): (start: number, end: number) => ByteRange[] {
    const order = this.starts.map((_, i) => i).sort((a, b) => this.starts[a] - this.starts[b]);
    const merged: ByteRange[] = [];
    for (const i of order) {
      const last = merged[merged.length - 1];
      if (last && this.starts[i] <= last[1]) last[1] = Math.max(last[1], this.ends[i]);
      else merged.push([this.starts[i], this.ends[i]]);
    }
    let k = 0;
    return (start, end) => {
      while (k < merged.length && merged[k][1] <= start) k++;
      const out: ByteRange[] = [];
      let pos = start;
      for (let j = k; j < merged.length && merged[j][0] < end; j++) {
        if (merged[j][0] > pos) out.push([pos, merged[j][0]]);
        pos = Math.max(pos, merged[j][1]);
      }
      if (pos < end) out.push([pos, end]);
      return out;
    };
  }
}

export class StreamingImport {
  private frontier = 0;
  private owner: FileHandle | null = null;
  /** Guest ranges written to `dest`: finalize need not copy them (exact unless `sunkUnknown`). */
  private readonly sunk = new SunkRanges();
  /** Streamed by the current claim and not yet recorded: host end, guest range. */
  private unrecorded: { hostEnd: number; guest: ByteRange }[] = [];
  private streamed = 0;
  private readonly writeback: EarlyWriteback;
  /**
   * Digests of the blocks streamed whole, hashed on the way so the commit
   * need not read them back; null once `dest` may hold bytes they do not
   * tell (an inherited disk, a failed or abandoned write).
   */
  private known: StreamedDigests | null;

  private constructor(
    private readonly layout: StreamLayout,
    private readonly dest: fsp.FileHandle,
    /** Streamed data goes through it: gathered, and past the page cache. */
    private readonly writer: DirectWriter,
    readonly destPath: string,
    private readonly diskSize: number,
    /** `dest` holds streamed bytes that `sunk` does not list (left by an earlier process). */
    private sunkUnknown: boolean,
  ) {
    this.writeback = new EarlyWriteback(dest);
    this.known = sunkUnknown ? null : new StreamedDigests(diskSize);
  }

  /**
   * The streaming import for an upload of `format` (null when the format has
   * no layout). `dest` is created at `diskSize`, or kept if an earlier process
   * left it.
   */
  static async open(opts: {
    format: string;
    fileSize: number | null;
    destPath: string;
    diskSize: number;
    /** The upload's staged image and what of it counts as received: to tidy a disk left by a crash. */
    stagingPath: string;
    received: RangeSet;
    /** A delta: an image naming a parent streams its own blocks (dest then holds only them). */
    differencing?: boolean;
  }): Promise<StreamingImport | null> {
    const codec = codecFor(opts.format);
    if (!codec.streamLayout) return null;
    const layoutOf = () => codec.streamLayout!(opts.fileSize, { differencing: opts.differencing });
    const dest = await fsp.open(opts.destPath, constants.O_RDWR | constants.O_CREAT, PRIVATE_FILE_MODE);
    let inherited: boolean;
    let writer: DirectWriter;
    try {
      const size = (await dest.stat()).size;
      inherited = size > 0;
      if (size !== opts.diskSize) await dest.truncate(opts.diskSize);
      // Its name must survive a power cut as long as the bytes streamed into it.
      if (!inherited) await fsyncDir(path.dirname(opts.destPath));
      else await zeroUnrecorded(layoutOf(), dest, opts);
      writer = await DirectWriter.open(opts.destPath, dest);
    } catch (err) {
      await dest.close();
      throw err;
    }
    return new StreamingImport(layoutOf(), dest, writer, opts.destPath, opts.diskSize, inherited);
  }

  /** Digests of blocks of `dest` known without reading it, for the commit (see streamed-digests.ts). */
  get digests(): StreamedDigests | null {
    return this.known;
  }

  /** Whether any byte of the upload went into the disk (or may have, before a restart). */
  get wroteDisk(): boolean {
    return this.streamed > 0 || this.sunkUnknown;
  }

  /** Bytes of the image that went straight into the disk. */
  get streamedBytes(): number {
    return this.streamed;
  }

  /**
   * Lets one writer carry the stream from `start`, when every byte before it
   * has arrived; returns false (write to staging only) otherwise. Bytes the
   * frontier skips over (sent out of order, or zeroed) were staged, so the
   * layout reads what it needs of them from staging.
   */
  async claim(start: number, received: RangeSet, staging: FileHandle): Promise<boolean> {
    if (this.owner || start < this.frontier || !received.covers(this.frontier, start)) return false;
    this.owner = staging;
    this.unrecorded = [];
    try {
      this.frontier = start;
      await this.learnReady();
    } catch (err) {
      this.owner = null;
      throw err;
    }
    return true;
  }

  release(): void {
    this.owner = null;
  }

  /** Whether bytes streamed by the current claim are not (yet) recorded as received. */
  hasUnrecorded(): boolean {
    return this.unrecorded.length > 0;
  }

  /**
   * The claiming write ended without its bytes being recorded (a body longer
   * than its Content-Range, a failed fdatasync): they will be sent again,
   * maybe otherwise. What they streamed is zeroed, nothing more streams, and
   * finalize overlays whatever arrives instead.
   */
  async abandon(): Promise<void> {
    this.layout.disable();
    this.owner = null;
    this.sunkUnknown = true;
    this.known = null;
    // Bytes still gathered belong to unrecorded ranges: dropped, then zeroed with the rest.
    await this.writer.discard();
    for (const { guest } of this.unrecorded.splice(0))
      await zeroRange(this.dest, guest[0], guest[1] - guest[0]);
  }

  /** landStream's write for the claiming writer: buf[0, length) holds image bytes [at, at + length). */
  async write(buf: Buffer, length: number, at: number, stage: StageWrite, opts: RouteOptions): Promise<void> {
    if (!this.owner || at !== this.frontier) return stage(buf, length, at);
    const end = at + length;
    try {
      let pos = at;
      while (pos < end) {
        await this.learnReady();
        const need = this.layout.need();
        const inNeed = need !== null && need[0] <= pos;
        const stop = inNeed ? Math.min(end, need[1]) : need ? Math.min(end, need[0]) : end;
        const slice = buf.subarray(pos - at, stop - at);
        await (inNeed ? stage(slice, stop - pos, pos) : this.route(slice, pos, stage, opts));
        pos = stop;
        this.frontier = pos;
      }
      await this.learnReady();
    } catch (err) {
      // An error leaves it unknown which bytes landed where: stage everything from here on.
      this.layout.disable();
      this.known = null;
      this.owner = null;
      throw err;
    }
  }

  /** Image bytes [at, at + buf.length), none of them metadata still to be read: data to dest, the rest staged. */
  private async route(buf: Buffer, at: number, stage: StageWrite, opts: RouteOptions): Promise<void> {
    const end = at + buf.length;
    const writes: Promise<void>[] = [];
    const stageRange = (s: number, e: number) => {
      if (e > s) writes.push(stage(buf.subarray(s - at, e - at), e - s, s));
    };
    let pos = at;
    for (const piece of this.layout.take(at, end)) {
      stageRange(pos, piece.host);
      // Data past the VDI's end stays staged: open() decides whether it may be dropped.
      const inside = Math.max(0, Math.min(piece.length, this.diskSize - piece.guest));
      for (const [s, e] of opts.writable?.(piece.host, piece.host + inside) ?? [
        [piece.host, piece.host + inside],
      ]) {
        writes.push(this.sink(buf.subarray(s - at, e - at), piece.guest + (s - piece.host), e, opts));
      }
      stageRange(piece.host + inside, piece.host + piece.length);
      pos = piece.host + piece.length;
    }
    stageRange(pos, end);
    await Promise.all(writes);
  }

  /** Writes image data to its guest offset in `dest`, zero blocks left as holes (or punched). */
  private async sink(data: Buffer, guest: number, hostEnd: number, opts: RouteOptions): Promise<void> {
    // The disk reads `data` there once these writes land (zero runs are holes or punched);
    // hashed now, while the bytes are at hand. A failure drops it all (write()).
    this.known?.feed(data, guest);
    const writes: Promise<unknown>[] = [];
    let written = 0;
    forEachRun(data, data.length, guest, (s, e, zero) => {
      if (zero) {
        if (opts.punchZeros) writes.push(this.writer.zero(guest + s, e - s));
        return;
      }
      writes.push(this.writer.write(data.subarray(s, e), guest + s));
      written += e - s;
    });
    try {
      await Promise.all(writes);
    } catch (err) {
      // Part of it may be gathered or on disk, and it will be sent again, maybe otherwise:
      // it counts as unrecorded, so abandon() drops and zeroes it with the rest. The
      // writer keeps its failure until then, so no sync() can record what it lost.
      await Promise.allSettled(writes);
      this.unrecorded.push({ hostEnd, guest: [guest, guest + data.length] });
      throw err;
    }
    this.writeback.wrote(written);
    this.sunk.add(guest, guest + data.length);
    this.unrecorded.push({ hostEnd, guest: [guest, guest + data.length] });
    if (this.sunk.count >= MAX_SUNK_RANGES) this.layout.disable();
    this.streamed += data.length;
  }

  /** Feeds the layout every metadata range that has fully arrived, read back from staging. */
  private async learnReady(): Promise<void> {
    if (this.owner) await learnFrom(this.layout, this.owner, this.frontier);
  }

  /**
   * Makes every byte written to `dest` durable (called with the staging
   * file's fdatasync, before received ranges are recorded).
   */
  async sync(): Promise<void> {
    await this.writer.flush();
    await this.writeback.settle();
    await this.dest.datasync();
  }

  /** The upload's bytes before `hostEnd` are recorded as received: what they streamed stays. */
  recorded(hostEnd: number): void {
    this.unrecorded = this.unrecorded.filter((u) => u.hostEnd > hostEnd);
  }

  /**
   * Completes `dest` from the staged image, opened and validated by its
   * codec (`disk` is that image at the VDI's size): `verifyEnd` checks what
   * only the complete file can tell, then the data that did not stream is
   * copied and `dest` made durable.
   */
  async finish(
    disk: BlockImage,
    staged: { path: string; virtualSize: number },
    progress: CopyProgress,
  ): Promise<void> {
    await this.writer.flush();
    await this.checkLayout(staged.path);
    if (this.sunkUnknown) await this.overlay(disk, progress);
    else await writeRawData(disk, this.writer, this.writeback, progress, this.sunk.complement());
    await this.writer.flush();
    // An image smaller than the VDI: nothing past its end may survive (a fixed VHD streams whole).
    if (staged.virtualSize < this.diskSize) {
      this.known?.forget(staged.virtualSize, this.diskSize);
      await zeroRange(this.dest, staged.virtualSize, this.diskSize - staged.virtualSize);
    }
    await this.writeback.settle();
    await this.dest.sync();
  }

  /**
   * Copies the staged image's non-zero bytes over `dest`, byte by byte. After
   * a restart it is unknown which bytes streamed into `dest` before: staging
   * reads as zeros there, but a 4 KiB block can hold both, so whole blocks
   * cannot be copied. (The slow path: it reads `dest` too.)
   */
  private async overlay(disk: BlockImage, progress: CopyProgress): Promise<void> {
    const extents = await disk.extents();
    for (const e of extents) {
      if (e.zero) continue;
      let pos = e.start;
      for await (const staged of readVirtual(disk, extents, e.start, e.start + e.length)) {
        progress.signal?.throwIfAborted();
        const merged = await readAt(this.dest, Buffer.alloc(staged.length), pos);
        for (let i = 0; i < staged.length; i++) if (staged[i] !== 0) merged[i] = staged[i];
        await guarded(spaceGuardOf(this.destPath), merged.length, () =>
          writeFully(this.dest, merged, 0, merged.length, pos),
        );
        this.writeback.wrote(staged.length);
        pos += staged.length;
      }
    }
  }

  /**
   * Learns the rest of the layout from the complete staged file (all of it,
   * after a restart), then lets it check what only the whole file tells.
   */
  private async checkLayout(stagedPath: string): Promise<void> {
    const h = await fsp.open(stagedPath, 'r');
    try {
      const size = (await h.stat()).size;
      await learnFrom(this.layout, h, size);
      const lastSector = await readAt(h, Buffer.alloc(512), Math.max(0, size - 512));
      this.layout.verifyEnd(lastSector, this.streamed > 0 || this.sunkUnknown);
    } finally {
      await h.close();
    }
  }

  async close(): Promise<void> {
    await this.writer.close();
    await this.writeback.settle().catch(() => {});
    await this.dest.close().catch(() => {});
  }
}

type FileHandle = fsp.FileHandle;

/** Feeds `layout` its needs that end by `limit`, read from `staging`. */
async function learnFrom(layout: StreamLayout, staging: FileHandle, limit: number): Promise<void> {
  for (let need = layout.need(); need && need[1] <= limit; need = layout.need()) {
    // Past the staged length: zeros, as open() reads them too.
    layout.learn(await readAt(staging, Buffer.alloc(need[1] - need[0]), need[0]));
  }
}

/**
 * A disk left by an earlier process may hold bytes that streamed in but
 * were never recorded as received (a kill -9 between the two). They will be
 * sent again, maybe otherwise, and a byte-wise overlay cannot undo a stale
 * non-zero byte: zero every place the staged layout maps to bytes not
 * received.
 */
async function zeroUnrecorded(
  layout: StreamLayout,
  dest: FileHandle,
  opts: { stagingPath: string; received: RangeSet; diskSize: number; fileSize: number | null },
): Promise<void> {
  // Everything arrived (a finalize run again after a restart): nothing is stale.
  if (opts.fileSize !== null && opts.received.covers(0, opts.fileSize)) return;
  const staging = await fsp.open(opts.stagingPath, 'r');
  try {
    await learnFrom(layout, staging, (await staging.stat()).size);
  } finally {
    await staging.close();
  }
  for (const piece of layout.take(0, Number.MAX_SAFE_INTEGER)) {
    for (const [s, e] of opts.received.missing(piece.host, piece.host + piece.length)) {
      const guest = piece.guest + (s - piece.host);
      const end = Math.min(opts.diskSize, guest + (e - s));
      if (end > guest) await zeroRange(dest, guest, end - guest);
    }
  }
}
