/**
 * A qcow2 file opened as a random-access virtual disk, read side only: qcow2
 * at rest is written whole by serialize, never patched in place.
 *
 * Implements these sections of qemu's docs/interop/qcow2.txt:
 * - "Cluster mapping" (L1 table, L2 tables, standard and compressed cluster
 *   descriptors, zero clusters of version 3, unallocated clusters read as
 *   zeros since backing files are refused)
 * - "Extended L2 Entries" (subcluster allocation and zero bitmaps)
 * - "Snapshots" only to the extent of ignoring them: the active L1 is read.
 * The header is handled in ./header.ts.
 *
 * Hand-written because no maintained npm package reads qcow2. Everything an
 * image points at is validated when it is opened (L1 and every L2 table,
 * every data and compressed cluster against the file's size), so a hostile
 * image fails with MalformedImageError before anything is read from it, and
 * the work done is bounded by the file's size: each L2 table may be used by
 * one L1 entry only, and compressed clusters inflate to one cluster at most.
 *
 * Refcounts are never read: reading needs only L1/L2. This is also why images
 * with the dirty bit (stale refcounts after a crash with lazy_refcounts) are
 * accepted: their mapping is intact, as qemu's read-only open agrees.
 */
import { promises as fsp } from 'node:fs';
import { inflateRawSync, constants as zlibConstants } from 'node:zlib';
import { MalformedImageError } from '../../errors.js';
import {
  type BlockImage,
  type ByteSpan,
  type Extent,
  mergeExtents,
  readByInto,
  readLength,
} from '../../image/block-image.js';
import type { DefinedRange } from '../../image/chain-image.js';
import { readAt } from '../../image/file-io.js';
import { isZero } from '../../image/zero.js';
import type { OpenOptions } from '../types.js';
import { parseHeader, peekClusterBits, type Qcow2Header, V2_HEADER_LENGTH_BYTES } from './header.js';

/** Upper bound on the bytes of L2 tables kept in memory per open image. */
const L2_CACHE_BYTES = 16 * 1024 * 1024;
/** Validation reads L2 tables that sit next to each other in one pread of at most this. */
const VALIDATE_READ_BYTES = 1024 * 1024;
/** Data reads in flight within one read(). */
const READS_IN_FLIGHT = 16;
/** Reads in flight while validating, and the bytes they may hold together. */
const VALIDATE_READS_IN_FLIGHT = 16;
const VALIDATE_WINDOW_BYTES = 8 * 1024 * 1024;
/** Compressed sizes are counted in 512-byte sectors whatever the cluster size. */
const COMPRESSED_SECTOR_BYTES = 512;
const TWO_POW_32 = 2 ** 32;
/** Bit 62 of an L2 entry, seen from its high 32-bit word. */
const HI_COMPRESSED = 0x40000000;
/** Bits 32..55 of a host offset (L1 entries, standard descriptors), in the high word. */
const HI_OFFSET_MASK = 0x00ffffff;
/** Bits 9..31 of a host offset, in the low word. */
const LO_OFFSET_MASK = 0xfffffe00;
const SUBCLUSTERS_PER_CLUSTER = 32;
/** L2 entries checked for zeros at once: an overlay's tables are mostly unallocated entries. */
const ZERO_SCAN_ENTRIES = 64;

/** How a guest cluster is stored (ClusterMapping.kind). */
const KIND_ZERO = 0;
const KIND_DATA = 1;
const KIND_COMPRESSED = 2;
/** Extended L2 standard cluster: bit i of allocMask says subcluster i is at hostOffset + i * subclusterSize. */
const KIND_SUBCLUSTERS = 3;

/**
 * One L2 entry, decoded. Returned, never kept on the image: reads run
 * concurrently, and each must see its own cluster's mapping.
 */
interface ClusterMapping {
  readonly kind: typeof KIND_ZERO | typeof KIND_DATA | typeof KIND_COMPRESSED | typeof KIND_SUBCLUSTERS;
  /** Where the data is (KIND_DATA, KIND_SUBCLUSTERS) or its compressed bytes start (KIND_COMPRESSED). */
  readonly hostOffset: number;
  /** KIND_COMPRESSED: how many bytes from hostOffset the compressed data may take. */
  readonly compressedBytes: number;
  /** KIND_SUBCLUSTERS: bit i set when subcluster i holds data. */
  readonly allocMask: number;
}

/** Shared by every cluster that reads as zeros: the common case allocates nothing. */
const ZERO_CLUSTER: ClusterMapping = Object.freeze({
  kind: KIND_ZERO,
  hostOffset: 0,
  compressedBytes: 0,
  allocMask: 0,
});

function malformed(message: string): MalformedImageError {
  return new MalformedImageError('qcow2', message);
}

function badEntry(j: number, l2Offset: number, problem: string): MalformedImageError {
  return malformed(`L2 entry ${j} of the table at ${l2Offset}: ${problem}`);
}

export class Qcow2Image implements BlockImage {
  readonly virtualSize: number;
  private readonly clusterSize: number;
  private readonly subclusterSize: number;
  private readonly l2Entries: number;
  private readonly l2Cache = new Map<number, Buffer>();
  private readonly l2CacheMaxTables: number;
  /** Bits of a compressed descriptor: offset below csizeShift, sector count above it. */
  private readonly csizeShift: bigint;
  private readonly csizeMask: bigint;
  private readonly coffsetMask: bigint;
  private lastInflated: { hostOffset: number; data: Buffer } | null = null;
  private closed = false;
  /** An overlay's backing file (opened with `differencing`): its unallocated clusters are its parent's. */
  readonly parent?: { fileName: string };

  private constructor(
    private readonly handle: fsp.FileHandle,
    private readonly header: Qcow2Header,
    private readonly fileSize: number,
    private readonly l1: Buffer,
  ) {
    this.virtualSize = header.virtualSizeBytes;
    this.clusterSize = header.clusterSizeBytes;
    this.subclusterSize = this.clusterSize / SUBCLUSTERS_PER_CLUSTER;
    this.l2Entries = header.l2Entries;
    this.l2CacheMaxTables = Math.max(4, Math.floor(L2_CACHE_BYTES / this.clusterSize));
    this.csizeShift = BigInt(62 - (header.clusterBits - 8));
    this.csizeMask = (1n << BigInt(header.clusterBits - 8)) - 1n;
    if (header.backingFile !== null) this.parent = { fileName: header.backingFile };
    this.coffsetMask = (1n << this.csizeShift) - 1n;
  }

  /**
   * Opens a qcow2 file; with `opts.differencing` an overlay too (a
   * DifferencingImage: see `defined`), whose backing file is not opened.
   */
  static async open(path: string, opts: OpenOptions = {}): Promise<Qcow2Image> {
    const handle = await fsp.open(path, 'r');
    try {
      const fileSize = (await handle.stat()).size;
      const first = await readAt(handle, Buffer.alloc(Math.min(fileSize, V2_HEADER_LENGTH_BYTES)), 0);
      const clusterBits = peekClusterBits(first);
      const head = await readAt(handle, Buffer.alloc(Math.min(fileSize, 2 ** clusterBits)), 0);
      const header = parseHeader(head, fileSize, { backing: opts.differencing });
      // parseHeader checked that the L1 table lies inside the file, so this
      // allocation is bounded by the file's size (and qemu's 32 MiB limit).
      const l1 = await readAt(handle, Buffer.alloc(header.l1Entries * 8), header.l1TableOffset);
      const image = new Qcow2Image(handle, header, fileSize, l1);
      await image.validateMapping();
      return image;
    } catch (err) {
      await handle.close();
      throw err;
    }
  }

  /**
   * Checks every L1 and L2 entry the disk uses, once, so that reads can trust
   * them. Each L2 table may be used by one L1 entry only: sharing would let a
   * small file describe an enormous amount of work, and qemu never writes it.
   */
  private async validateMapping(): Promise<void> {
    const { clusterSize, fileSize } = this;
    const l1Start = this.header.l1TableOffset;
    const l1End = l1Start + this.l1.length;
    // Typed arrays, not objects: an L1 table may name millions of L2 tables.
    let tableCount = 0;
    for (let i = 0; i < this.header.l1Entries; i++) {
      const l2Offset = this.l1Offset(i);
      if (l2Offset === 0) continue;
      if (l2Offset % clusterSize !== 0) {
        throw malformed(`L1 entry ${i} points at L2 table offset ${l2Offset}, not a cluster boundary`);
      }
      if (l2Offset + clusterSize > fileSize) {
        throw malformed(
          `L1 entry ${i} points at L2 table offset ${l2Offset}, past the end of the ${fileSize}-byte file`,
        );
      }
      if (l2Offset < l1End && l2Offset + clusterSize > l1Start) {
        throw malformed(`L1 entry ${i} points at the L1 table itself (offset ${l2Offset})`);
      }
      tableCount++;
    }
    const order = new Int32Array(tableCount);
    for (let i = 0, k = 0; i < this.header.l1Entries; i++) if (this.l1Offset(i) !== 0) order[k++] = i;
    order.sort((a, b) => this.l1Offset(a) - this.l1Offset(b));
    /** L2 table offsets in file order, parallel to `order` (their L1 indices). */
    const l2Offsets = new Float64Array(tableCount);
    for (let k = 0; k < tableCount; k++) {
      l2Offsets[k] = this.l1Offset(order[k]);
      if (k > 0 && l2Offsets[k] === l2Offsets[k - 1]) {
        throw malformed(
          `L2 table at offset ${l2Offsets[k]} is used by L1 entries ${order[k - 1]} and ${order[k]}; each table belongs to one entry`,
        );
      }
    }
    const isL2Table = (clusterOffset: number): boolean => {
      let lo = 0;
      let hi = tableCount - 1;
      while (lo <= hi) {
        const mid = (lo + hi) >> 1;
        if (l2Offsets[mid] === clusterOffset) return true;
        if (l2Offsets[mid] < clusterOffset) lo = mid + 1;
        else hi = mid - 1;
      }
      return false;
    };
    const overlapsMetadata = (offset: number, length: number): boolean => {
      if (offset < l1End && offset + length > l1Start) return true;
      for (let c = offset - (offset % clusterSize); c < offset + length; c += clusterSize) {
        if (isL2Table(c)) return true;
      }
      return false;
    };
    // No two guest clusters may share storage (see HostClusters).
    const storage = new HostClusters(fileSize, clusterSize);
    const validateTable = (table: Buffer, l1Index: number, l2Offset: number) => {
      const count = Math.min(this.l2Entries, this.guestClusters() - l1Index * this.l2Entries);
      for (let j = 0; j < count; j++) {
        const unallocated = this.zeroEntries(table, j, count);
        if (unallocated > 0) {
          j += unallocated - 1;
          continue;
        }
        const { kind, hostOffset, compressedBytes, allocMask } = this.decode(table, j, l2Offset);
        if (kind === KIND_DATA || kind === KIND_SUBCLUSTERS) {
          const lastUsed =
            hostOffset + (kind === KIND_DATA ? 0 : (31 - Math.clz32(allocMask)) * this.subclusterSize);
          if (lastUsed >= fileSize) {
            throw badEntry(
              j,
              l2Offset,
              `data cluster ${hostOffset} lies past the end of the ${fileSize}-byte file`,
            );
          }
          if (overlapsMetadata(hostOffset, clusterSize)) {
            throw badEntry(j, l2Offset, `data cluster ${hostOffset} holds the L1 or an L2 table`);
          }
          storage.claimData(hostOffset, j, l2Offset);
        } else if (kind === KIND_COMPRESSED) {
          if (hostOffset < clusterSize || hostOffset >= fileSize) {
            throw badEntry(
              j,
              l2Offset,
              `compressed data at ${hostOffset} lies outside the data area of the ${fileSize}-byte file`,
            );
          }
          if (overlapsMetadata(hostOffset, Math.min(compressedBytes, fileSize - hostOffset))) {
            throw badEntry(j, l2Offset, `compressed data at ${hostOffset} overlaps the L1 or an L2 table`);
          }
          storage.claimCompressed(
            hostOffset,
            hostOffset + Math.min(compressedBytes, fileSize - hostOffset),
            j,
            l2Offset,
          );
        }
      }
    };
    // Tables that sit next to each other in the file are read together, and
    // a window of reads is in flight at once: qemu-img interleaves L2 tables
    // with data, and thousands of sequential 512-byte preads would dominate
    // opening an image with small clusters. Validation then runs in file
    // order, so the error reported for a bad image is always the same.
    const perRead = Math.max(1, Math.floor(VALIDATE_READ_BYTES / clusterSize));
    const groups: { first: number; count: number }[] = [];
    for (let t = 0; t < tableCount; ) {
      let n = 1;
      while (n < perRead && t + n < tableCount && l2Offsets[t + n] === l2Offsets[t] + n * clusterSize) n++;
      groups.push({ first: t, count: n });
      t += n;
    }
    for (let g = 0; g < groups.length; ) {
      const window: { first: number; count: number }[] = [];
      let bytes = 0;
      while (g < groups.length && window.length < VALIDATE_READS_IN_FLIGHT && bytes < VALIDATE_WINDOW_BYTES) {
        window.push(groups[g]);
        bytes += groups[g].count * clusterSize;
        g++;
      }
      const batches = await Promise.all(
        window.map((w) => readAt(this.handle, Buffer.alloc(w.count * clusterSize), l2Offsets[w.first])),
      );
      for (const [w, { first, count }] of window.entries()) {
        for (let k = 0; k < count; k++) {
          const offset = l2Offsets[first + k];
          const table = batches[w].subarray(k * clusterSize, (k + 1) * clusterSize);
          validateTable(table, order[first + k], offset);
          // Keep what fits in the cache (copied, so the batch can be freed).
          if (this.l2Cache.size < this.l2CacheMaxTables) this.l2Cache.set(offset, Buffer.from(table));
        }
      }
    }
  }

  private guestClusters(): number {
    return Math.ceil(this.virtualSize / this.clusterSize);
  }

  /** Host offset of the L2 table of L1 entry `i` (0: unallocated). */
  private l1Offset(i: number): number {
    return descriptorOffset(this.l1.readUInt32BE(i * 8), this.l1.readUInt32BE(i * 8 + 4));
  }

  /** The L2 table at `l2Offset`, from the cache when there (least recently used evicted first). */
  private async loadL2(l2Offset: number): Promise<Buffer> {
    const cached = this.l2Cache.get(l2Offset);
    if (cached) {
      // Re-insert: Map iteration order makes the first key the least recently used.
      this.l2Cache.delete(l2Offset);
      this.l2Cache.set(l2Offset, cached);
      return cached;
    }
    const table = await readAt(this.handle, Buffer.alloc(this.clusterSize), l2Offset);
    if (this.l2Cache.size >= this.l2CacheMaxTables) {
      const oldest = this.l2Cache.keys().next().value;
      if (oldest !== undefined) this.l2Cache.delete(oldest);
    }
    this.l2Cache.set(l2Offset, table);
    return table;
  }

  /**
   * How many entries of `table` from `j` (below `count`) are all zero bytes:
   * unallocated clusters, read through to the backing file (as zeros
   * without one). An overlay's tables are mostly such entries: skipping
   * them in bulk keeps opening and walking a chain's layers cheap.
   */
  private zeroEntries(table: Buffer, j: number, count: number): number {
    const bytes = this.header.l2EntryBytes;
    let k = j;
    while (k + ZERO_SCAN_ENTRIES <= count && isZero(table, k * bytes, (k + ZERO_SCAN_ENTRIES) * bytes)) {
      k += ZERO_SCAN_ENTRIES;
    }
    while (k < count && isZero(table, k * bytes, (k + 1) * bytes)) k++;
    return k - j;
  }

  /** Decodes L2 entry `j` of `table`, rejecting what the spec forbids. */
  private decode(table: Buffer, j: number, l2Offset: number): ClusterMapping {
    const pos = j * this.header.l2EntryBytes;
    const hi = table.readUInt32BE(pos);
    const lo = table.readUInt32BE(pos + 4);
    const extended = this.header.extendedL2;
    const allocMask = extended ? table.readUInt32BE(pos + 12) : 0;
    const zeroMask = extended ? table.readUInt32BE(pos + 8) : 0;
    if (hi & HI_COMPRESSED) {
      if (allocMask !== 0 || zeroMask !== 0)
        throw badEntry(j, l2Offset, 'compressed cluster with a subcluster bitmap');
      const entry = (BigInt(hi) << 32n) | BigInt(lo);
      const hostOffset = Number(entry & this.coffsetMask);
      const sectors = Number((entry >> this.csizeShift) & this.csizeMask) + 1;
      const compressedBytes = sectors * COMPRESSED_SECTOR_BYTES - (hostOffset % COMPRESSED_SECTOR_BYTES);
      return { kind: KIND_COMPRESSED, hostOffset, compressedBytes, allocMask: 0 };
    }
    const hostOffset = descriptorOffset(hi, lo);
    if (hostOffset % this.clusterSize !== 0) {
      throw badEntry(j, l2Offset, `host offset ${hostOffset} is not a cluster boundary`);
    }
    if (extended) {
      if ((allocMask & zeroMask) !== 0) throw badEntry(j, l2Offset, 'subclusters both allocated and zero');
      if (hostOffset === 0 && allocMask !== 0)
        throw badEntry(j, l2Offset, 'allocated subclusters without a cluster');
      return allocMask === 0
        ? ZERO_CLUSTER
        : { kind: KIND_SUBCLUSTERS, hostOffset, compressedBytes: 0, allocMask };
    }
    // Bit 0 reads as zeros in version 3. Version 2 has no zero clusters: qemu
    // refuses to read such an entry ("Zero cluster entry found in pre-v3
    // image"), and so do we, rather than read as zeros what qemu cannot read.
    if (lo & 1 && this.header.version === 2) {
      throw badEntry(j, l2Offset, 'the zero flag (bit 0) is set, which version 2 images do not have');
    }
    // Offset 0 is "unallocated": without a backing file that reads as zeros.
    return lo & 1 || hostOffset === 0
      ? ZERO_CLUSTER
      : { kind: KIND_DATA, hostOffset, compressedBytes: 0, allocMask: 0 };
  }

  read(offset: number, length: number): Promise<Buffer> {
    return readByInto(this, offset, length);
  }

  async readInto(buf: Buffer, offset: number): Promise<Buffer> {
    const n = readLength(this.virtualSize, offset, buf.length);
    this.assertOpen();
    // Every byte of out is written below: zeros, data read over it, or inflated bytes.
    const out = buf.subarray(0, n);
    const end = offset + n;
    const { clusterSize, subclusterSize, l2Entries } = this;
    // A pending host read, extended while consecutive pieces are contiguous
    // on the host too, so a dense image costs one pread per run, not per
    // cluster. Runs are read concurrently (qemu interleaves L2 tables with
    // data, so small clusters make many short runs), a bounded number at once.
    let runOut = 0;
    let runHost = 0;
    let runLength = 0;
    let inFlight: Promise<Buffer>[] = [];
    const startRun = async () => {
      const read = readAt(this.handle, out.subarray(runOut, runOut + runLength), runHost);
      read.catch(() => {}); // awaited later, maybe after another await has thrown: never unhandled
      inFlight.push(read);
      if (inFlight.length >= READS_IN_FLIGHT) {
        const reads = inFlight;
        inFlight = [];
        await Promise.all(reads);
      }
    };
    const addData = async (outPos: number, host: number, len: number) => {
      if (runLength > 0 && runOut + runLength === outPos && runHost + runLength === host) {
        runLength += len;
        return;
      }
      if (runLength > 0) await startRun();
      runOut = outPos;
      runHost = host;
      runLength = len;
    };
    try {
      let tableIndex = -1;
      let table: Buffer | null = null;
      let l2Offset = 0;
      let pos = offset;
      while (pos < end) {
        const guestCluster = Math.floor(pos / clusterSize);
        const clusterStart = guestCluster * clusterSize;
        const stop = Math.min(end, clusterStart + clusterSize);
        const l1Index = Math.floor(guestCluster / l2Entries);
        if (l1Index !== tableIndex) {
          tableIndex = l1Index;
          l2Offset = this.l1Offset(l1Index);
          table = l2Offset === 0 ? null : await this.loadL2(l2Offset);
        }
        const mapping = table ? this.decode(table, guestCluster % l2Entries, l2Offset) : ZERO_CLUSTER;
        const { kind, hostOffset } = mapping;
        if (kind === KIND_ZERO) {
          out.fill(0, pos - offset, stop - offset);
        } else if (kind === KIND_DATA) {
          await addData(pos - offset, hostOffset + (pos - clusterStart), stop - pos);
        } else if (kind === KIND_COMPRESSED) {
          const data = await this.inflate(hostOffset, mapping.compressedBytes);
          data.copy(out, pos - offset, pos - clusterStart, stop - clusterStart);
        } else {
          const { allocMask } = mapping;
          for (let p = pos; p < stop; ) {
            const sub = Math.floor((p - clusterStart) / subclusterSize);
            const subStop = Math.min(stop, clusterStart + (sub + 1) * subclusterSize);
            if ((allocMask >>> sub) & 1)
              await addData(p - offset, hostOffset + (p - clusterStart), subStop - p);
            else out.fill(0, p - offset, subStop - offset);
            p = subStop;
          }
        }
        pos = stop;
      }
      if (runLength > 0) await startRun();
      await Promise.all(inFlight);
    } catch (err) {
      // Leave no read running into `out` (or rejecting unobserved) behind us.
      await Promise.allSettled(inFlight);
      throw err;
    }
    return out;
  }

  /**
   * Inflates one compressed cluster as qemu does: raw deflate, output exactly
   * one cluster (longer or shorter is corruption). The input is at most two
   * clusters by construction of the descriptor, and zlib stops at one cluster
   * of output, so a deflate bomb costs nothing.
   */
  private async inflate(hostOffset: number, compressedBytes: number): Promise<Buffer> {
    if (this.lastInflated?.hostOffset === hostOffset) return this.lastInflated.data;
    const input = await readAt(
      this.handle,
      Buffer.alloc(Math.min(compressedBytes, this.fileSize - hostOffset)),
      hostOffset,
    );
    let data: Buffer;
    try {
      // Z_SYNC_FLUSH: the descriptor only bounds the input to whole sectors,
      // so a stream cut short is reported by its output size, not by zlib.
      data = inflateRawSync(input, {
        maxOutputLength: this.clusterSize,
        finishFlush: zlibConstants.Z_SYNC_FLUSH,
      });
    } catch (err) {
      const tooLarge = (err as NodeJS.ErrnoException).code === 'ERR_BUFFER_TOO_LARGE';
      throw malformed(
        tooLarge
          ? `compressed cluster at ${hostOffset} inflates to more than one ${this.clusterSize}-byte cluster`
          : `compressed cluster at ${hostOffset} does not inflate: ${(err as Error).message}`,
      );
    }
    if (data.length !== this.clusterSize) {
      throw malformed(
        `compressed cluster at ${hostOffset} inflates to ${data.length} bytes, not ${this.clusterSize}`,
      );
    }
    this.lastInflated = { hostOffset, data };
    return data;
  }

  async extents(): Promise<Extent[]> {
    this.assertOpen();
    const out: Extent[] = [];
    const push = (start: number, length: number, zero: boolean) => {
      const last = out[out.length - 1];
      if (last && last.zero === zero && last.start + last.length === start) last.length += length;
      else out.push({ start, length, zero });
    };
    const { clusterSize, subclusterSize, virtualSize, l2Entries } = this;
    const tableSpan = clusterSize * l2Entries;
    for (let i = 0; i < this.header.l1Entries; i++) {
      const tableStart = i * tableSpan;
      const l2Offset = this.l1Offset(i);
      if (l2Offset === 0) {
        push(tableStart, Math.min(tableSpan, virtualSize - tableStart), true);
        continue;
      }
      const table = await this.loadL2(l2Offset);
      const count = Math.min(l2Entries, Math.ceil((virtualSize - tableStart) / clusterSize));
      for (let j = 0; j < count; j++) {
        const start = tableStart + j * clusterSize;
        const unallocated = this.zeroEntries(table, j, count);
        if (unallocated > 0) {
          push(start, Math.min(unallocated * clusterSize, virtualSize - start), true);
          j += unallocated - 1;
          continue;
        }
        const { kind, allocMask } = this.decode(table, j, l2Offset);
        if (kind !== KIND_SUBCLUSTERS) {
          push(start, Math.min(clusterSize, virtualSize - start), kind === KIND_ZERO);
          continue;
        }
        for (let sub = 0; sub < SUBCLUSTERS_PER_CLUSTER; sub++) {
          const subStart = start + sub * subclusterSize;
          if (subStart >= virtualSize) break;
          push(subStart, Math.min(subclusterSize, virtualSize - subStart), ((allocMask >>> sub) & 1) === 0);
        }
      }
    }
    return mergeExtents(out);
  }

  /** Clusters (or subclusters) with no host offset and no zero flag: what qemu calls unallocated. */
  async unallocated(): Promise<ByteSpan[]> {
    this.assertOpen();
    const out: ByteSpan[] = [];
    const push = (start: number, length: number) => {
      const last = out[out.length - 1];
      if (last && last.start + last.length === start) last.length += length;
      else out.push({ start, length });
    };
    const { clusterSize, subclusterSize, virtualSize, l2Entries } = this;
    const { extendedL2, l2EntryBytes } = this.header;
    const tableSpan = clusterSize * l2Entries;
    for (let i = 0; i < this.header.l1Entries; i++) {
      const tableStart = i * tableSpan;
      if (tableStart >= virtualSize) break;
      const l2Offset = this.l1Offset(i);
      if (l2Offset === 0) {
        push(tableStart, Math.min(tableSpan, virtualSize - tableStart));
        continue;
      }
      const table = await this.loadL2(l2Offset);
      const count = Math.min(l2Entries, Math.ceil((virtualSize - tableStart) / clusterSize));
      for (let j = 0; j < count; j++) {
        const start = tableStart + j * clusterSize;
        const zeros = this.zeroEntries(table, j, count);
        if (zeros > 0) {
          push(start, Math.min(zeros * clusterSize, virtualSize - start));
          j += zeros - 1;
          continue;
        }
        const pos = j * l2EntryBytes;
        const hi = table.readUInt32BE(pos);
        const lo = table.readUInt32BE(pos + 4);
        if (hi & HI_COMPRESSED) continue;
        if (!extendedL2) {
          if (!(lo & 1) && descriptorOffset(hi, lo) === 0)
            push(start, Math.min(clusterSize, virtualSize - start));
          continue;
        }
        const zeroMask = table.readUInt32BE(pos + 8);
        const allocMask = table.readUInt32BE(pos + 12);
        for (let sub = 0; sub < SUBCLUSTERS_PER_CLUSTER; sub++) {
          const subStart = start + sub * subclusterSize;
          if (subStart >= virtualSize) break;
          if ((((allocMask | zeroMask) >>> sub) & 1) === 0) {
            push(subStart, Math.min(subclusterSize, virtualSize - subStart));
          }
        }
      }
    }
    return out;
  }

  /**
   * The ranges this image defines itself ("Cluster mapping": everything but
   * unallocated clusters and subclusters, which read from the backing file;
   * zero clusters are defined, as zeros). The whole disk without a backing file.
   */
  async defined(): Promise<DefinedRange[]> {
    this.assertOpen();
    const { virtualSize } = this;
    if (!this.parent) return virtualSize > 0 ? [{ start: 0, length: virtualSize }] : [];
    // The complement of what qemu calls unallocated.
    const out: DefinedRange[] = [];
    let pos = 0;
    for (const hole of await this.unallocated()) {
      if (hole.start > pos) out.push({ start: pos, length: hole.start - pos });
      pos = Math.max(pos, hole.start + hole.length);
    }
    if (pos < virtualSize) out.push({ start: pos, length: virtualSize - pos });
    return out;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.l2Cache.clear();
    this.lastInflated = null;
    await this.handle.close();
  }

  private assertOpen(): void {
    if (this.closed) throw new Error('qcow2 image is closed');
  }
}

/**
 * Which host clusters hold plain data, and which compressed data, one bit
 * each (memory follows the file's size, not what its tables claim). qemu
 * never lets two guest clusters of the active table share a host cluster,
 * nor compressed data overlap a data cluster: such an image is corrupt (its
 * refcounts cannot be right), and an import that places data as it streams
 * in relies on each host byte belonging to one guest place.
 */
class HostClusters {
  private readonly data: Uint8Array;
  private readonly compressed: Uint8Array;

  constructor(
    fileSize: number,
    private readonly clusterSize: number,
  ) {
    const bytes = Math.ceil(Math.ceil(fileSize / clusterSize) / 8);
    this.data = new Uint8Array(bytes);
    this.compressed = new Uint8Array(bytes);
  }

  claimData(hostOffset: number, j: number, l2Offset: number): void {
    const c = hostOffset / this.clusterSize;
    if (testBit(this.data, c)) {
      throw badEntry(j, l2Offset, `data cluster ${hostOffset} is used by two guest clusters`);
    }
    if (testBit(this.compressed, c)) {
      throw badEntry(j, l2Offset, `data cluster ${hostOffset} overlaps compressed data`);
    }
    setBit(this.data, c);
  }

  claimCompressed(start: number, end: number, j: number, l2Offset: number): void {
    for (let c = Math.floor(start / this.clusterSize); c * this.clusterSize < end; c++) {
      if (testBit(this.data, c)) {
        throw badEntry(
          j,
          l2Offset,
          `compressed data at ${start} overlaps data cluster ${c * this.clusterSize}`,
        );
      }
      setBit(this.compressed, c);
    }
  }
}

// Division, not shifts: a large file of small clusters has more than 2^31 of them.
function testBit(bits: Uint8Array, i: number): boolean {
  return (bits[Math.floor(i / 8)] & (1 << (i % 8))) !== 0;
}

function setBit(bits: Uint8Array, i: number): void {
  bits[Math.floor(i / 8)] |= 1 << (i % 8);
}

/** The host offset in an L1 entry or a standard L2 descriptor, from its two 32-bit words. */
export function descriptorOffset(hi: number, lo: number): number {
  return (hi & HI_OFFSET_MASK) * TWO_POW_32 + ((lo & LO_OFFSET_MASK) >>> 0);
}

/**
 * The host offset of a standard L2 descriptor's cluster when it holds plain
 * data (as decode() reads it: not compressed, not zero, not unallocated),
 * else -1.
 */
export function plainDataOffset(hi: number, lo: number): number {
  if (hi & HI_COMPRESSED || lo & 1) return -1;
  const offset = descriptorOffset(hi, lo);
  return offset === 0 ? -1 : offset;
}
