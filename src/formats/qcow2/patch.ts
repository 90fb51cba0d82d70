/**
 * Writes into a qcow2 file of diskport's own layout in place: the layers of
 * a qcow2 chain at rest (docs/design.md, "Layer files per SR format"), whose
 * commits write a new overlay and whose merges write clusters into an
 * existing one while readers hold it open.
 *
 * Implements, for writing, these sections of qemu's docs/interop/qcow2.txt:
 * "Header" (version 3, 64 KiB clusters, 16-bit refcounts, the backing file
 * name and the "Backing file format name" extension), "Cluster mapping"
 * (standard descriptors with bit 63, and zero clusters: bit 0 without a host
 * offset) and "Host cluster management" (refcounts rebuilt whole).
 *
 * Why this order makes a kill -9 harmless to every reader: data clusters go
 * to fresh clusters at the end of the file (or over a cluster the file maps
 * there already, which the caller guarantees no reader reads), then the L2
 * and L1 entries that point at them, then fresh refcount structures
 * counting exactly what the tables reference, and last the first header
 * sector (refcount table, L1, size, backing file), one 512-byte write. The
 * old refcount clusters then count for nothing: free, not leaked, so
 * `qemu-img check` stays clean. A crash before that sector leaves refcounts
 * that do not yet count the new clusters (reads do not use refcounts); the
 * caller runs the same writes again, which are idempotent.
 *
 * Memory: the L2 tables touched (64 KiB each) and one bit per host cluster
 * while refcounts are rebuilt.
 */
import { constants as fsConstants, promises as fsp } from 'node:fs';
import { readAt, writeFully } from '../../image/file-io.js';
import { QCOW2_MAGIC } from './header.js';
import { descriptorOffset } from './image.js';
import { EXPORT_CLUSTER_BITS, EXPORT_CLUSTER_SIZE_BYTES } from './serialize.js';

const C = EXPORT_CLUSTER_SIZE_BYTES;
const L2_ENTRIES = C / 8;
const L2_SPAN = L2_ENTRIES * C;
const REFCOUNTS_PER_BLOCK = C / 2;
const HEADER_LENGTH = 112;
const SECTOR = 512;
const EXT_BACKING_FORMAT = 0xe2792aca;
/** Two places for the backing file name, used in turn: a rename writes the one not in use. */
const NAME_SLOTS = [512, 2048];
const MAX_NAME_BYTES = 1023;
const HI_COPIED = 0x80000000;
const HI_COMPRESSED = 0x40000000;
const TWO_POW_32 = 2 ** 32;

/** Not a file this module writes into: a qcow2 that diskport did not lay out. */
export class NotOwnQcow2Error extends Error {}

interface Table {
  /** Host offset of the table in the file; 0 until it has one. */
  offset: number;
  entries: Buffer;
  dirty: boolean;
}

export class Qcow2Patch {
  private readonly tables = new Map<number, Table>();
  private l1: Float64Array;
  private end: number;
  /** Whether anything but the backing file name changed since opening (else refcounts stay as they are). */
  private changed = false;

  private constructor(
    private readonly handle: fsp.FileHandle,
    private readonly head: Buffer,
    private virtualSize: number,
    private l1Offset: number,
    l1: Float64Array,
    fileSize: number,
  ) {
    this.l1 = l1;
    this.end = Math.ceil(fileSize / C) * C;
  }

  /** Creates (or truncates) `file` as an empty disk of `virtualSize` over `backing` (a file name beside it). */
  static async create(file: string, virtualSize: number, backing: string | null): Promise<Qcow2Patch> {
    const handle = await fsp.open(
      file,
      fsConstants.O_RDWR | fsConstants.O_CREAT | fsConstants.O_TRUNC,
      0o600,
    );
    try {
      const l1Entries = Math.ceil(virtualSize / L2_SPAN);
      const l1Clusters = Math.max(1, Math.ceil((l1Entries * 8) / C));
      const head = Buffer.alloc(C);
      head.writeUInt32BE(QCOW2_MAGIC, 0);
      head.writeUInt32BE(3, 4);
      head.writeUInt32BE(EXPORT_CLUSTER_BITS, 20);
      head.writeUInt32BE(4, 96); // refcount_order: 16-bit
      head.writeUInt32BE(HEADER_LENGTH, 100);
      writeU64(head, 40, C);
      head.writeUInt32BE(l1Entries, 36);
      writeU64(head, 24, virtualSize);
      if (backing !== null) setBackingFields(head, backing, NAME_SLOTS[0]).copy(head, NAME_SLOTS[0]);
      await writeFully(handle, head, 0, C, 0);
      await handle.truncate(C * (1 + l1Clusters));
      const patch = new Qcow2Patch(
        handle,
        head,
        virtualSize,
        C,
        new Float64Array(l1Entries),
        C * (1 + l1Clusters),
      );
      patch.changed = true; // it has no refcounts yet
      return patch;
    } catch (err) {
      await handle.close();
      throw err;
    }
  }

  /** Opens a qcow2 file diskport laid out (its serializer's or this module's), for writing. */
  static async open(file: string): Promise<Qcow2Patch> {
    const handle = await fsp.open(file, fsConstants.O_RDWR);
    try {
      const fileSize = (await handle.stat()).size;
      const head = await readAt(handle, Buffer.alloc(C), 0);
      const ok =
        head.readUInt32BE(0) === QCOW2_MAGIC &&
        head.readUInt32BE(4) === 3 &&
        head.readUInt32BE(20) === EXPORT_CLUSTER_BITS &&
        head.readUInt32BE(96) === 4 &&
        head.readUInt32BE(100) === HEADER_LENGTH &&
        head.readBigUInt64BE(72) === 0n && // incompatible features
        head.readUInt32BE(60) === 0; // no internal snapshots
      if (!ok) throw new NotOwnQcow2Error(`${file} is not a qcow2 layer diskport wrote`);
      const virtualSize = Number(head.readBigUInt64BE(24));
      const l1Entries = head.readUInt32BE(36);
      const l1Offset = Number(head.readBigUInt64BE(40));
      const raw = await readAt(handle, Buffer.alloc(l1Entries * 8), l1Offset);
      const l1 = new Float64Array(l1Entries);
      for (let i = 0; i < l1Entries; i++)
        l1[i] = descriptorOffset(raw.readUInt32BE(i * 8), raw.readUInt32BE(i * 8 + 4));
      return new Qcow2Patch(handle, head, virtualSize, l1Offset, l1, fileSize);
    } catch (err) {
      await handle.close();
      throw err;
    }
  }

  /** The backing file name the header holds now, or null. */
  get backing(): string | null {
    const offset = Number(this.head.readBigUInt64BE(8));
    if (offset === 0) return null;
    return this.head.toString('utf8', offset, offset + this.head.readUInt32BE(16));
  }

  get size(): number {
    return this.virtualSize;
  }

  /** Grows the disk (committed with the rest); its new end reads from the backing file, or as zeros. */
  grow(virtualSize: number): void {
    if (virtualSize < this.virtualSize) throw new RangeError('a qcow2 layer does not shrink');
    this.changed ||= virtualSize !== this.virtualSize;
    this.virtualSize = virtualSize;
    const entries = Math.ceil(virtualSize / L2_SPAN);
    if (entries > this.l1.length) {
      const l1 = new Float64Array(entries);
      l1.set(this.l1);
      this.l1 = l1;
    }
  }

  /**
   * Makes `data` the guest's bytes at `offset` (cluster-aligned; the data a
   * whole number of clusters, or reaching the disk's end). A cluster the
   * file maps already is overwritten where it lies; others go to fresh
   * clusters at the end.
   */
  async write(offset: number, data: Buffer): Promise<void> {
    checkAligned(offset);
    if (offset + data.length > this.virtualSize) throw new RangeError('write past the end of the disk');
    let pos = 0;
    while (pos < data.length) {
      const guest = (offset + pos) / C;
      const host = await this.hostOf(guest);
      if (host > 0) {
        const n = Math.min(C, data.length - pos);
        await writeFully(this.handle, data, pos, n, host);
        pos += n;
        continue;
      }
      // A run of unmapped clusters: one write to fresh clusters.
      let count = 1;
      while (pos + count * C < data.length && (await this.hostOf(guest + count)) === 0) count++;
      const n = Math.min(count * C, data.length - pos);
      const at = this.end;
      this.end += count * C;
      await writeFully(this.handle, data, pos, n, at);
      for (let k = 0; k < count; k++) await this.setEntry(guest + k, at + k * C, HI_COPIED, 0);
      pos += n;
    }
  }

  /** Makes [offset, offset + length) read as zeros, whatever the backing file holds (v3 zero clusters). */
  async zero(offset: number, length: number): Promise<void> {
    checkAligned(offset);
    const end = Math.min(this.virtualSize, offset + length);
    for (let g = offset / C; g * C < end; g++) await this.setEntry(g, 0, 0, 1);
  }

  /**
   * Makes everything written durable and the file whole: tables, refcounts,
   * then the first header sector with the size and `backing` (undefined:
   * unchanged; null: none), each step fsynced before the next.
   */
  async commit(opts: { backing?: string | null } = {}): Promise<void> {
    const h = this.handle;
    if (!this.changed) return this.rename(opts.backing);
    await h.datasync();
    // Copy on write: every changed L2 table and the L1 table go to new
    // clusters, so until the last step (the first sector) the header in force
    // reads the tables it always read, whose clusters its refcounts count. A
    // table rewritten in place would point at clusters the old refcounts say
    // are free: a crash before the switch would leave a corrupt image.
    for (const [index, table] of this.tables) {
      if (!table.dirty) continue;
      table.offset = this.end;
      this.end += C;
      this.l1[index] = table.offset;
      await writeFully(h, table.entries, 0, C, table.offset);
      table.dirty = false;
    }
    const l1Clusters = Math.max(1, Math.ceil((this.l1.length * 8) / C));
    this.l1Offset = this.end;
    this.end += l1Clusters * C;
    const l1 = Buffer.alloc(Math.ceil((this.l1.length * 8) / C) * C);
    for (let i = 0; i < this.l1.length; i++) if (this.l1[i] > 0) writeU64(l1, i * 8, this.l1[i], HI_COPIED);
    await writeFully(h, l1, 0, l1.length, this.l1Offset);
    const head = Buffer.from(this.head.subarray(0, SECTOR));
    if (opts.backing !== undefined) {
      head.fill(0, 8, 20);
      head.fill(0, HEADER_LENGTH, SECTOR);
      if (opts.backing !== null) {
        const current = Number(this.head.readBigUInt64BE(8));
        const slot = current === NAME_SLOTS[0] ? NAME_SLOTS[1] : NAME_SLOTS[0];
        const name = setBackingFields(head, opts.backing, slot);
        await writeFully(h, name, 0, name.length, slot);
        name.copy(this.head, slot);
      }
    }
    await h.sync();
    const refcounts = await this.writeRefcounts();
    await h.truncate(this.end);
    await h.sync();
    writeU64(head, 24, this.virtualSize);
    head.writeUInt32BE(this.l1.length, 36);
    writeU64(head, 40, this.l1Offset);
    writeU64(head, 48, refcounts.offset);
    head.writeUInt32BE(refcounts.clusters, 56);
    await writeFully(h, head, 0, SECTOR, 0);
    head.copy(this.head, 0);
    await h.sync();
  }

  async close(): Promise<void> {
    await this.handle.close();
  }

  /** Only the backing file changes: its name in the free slot, then the first sector. */
  private async rename(backing: string | null | undefined): Promise<void> {
    if (backing === undefined) return;
    const head = Buffer.from(this.head.subarray(0, SECTOR));
    head.fill(0, 8, 20);
    head.fill(0, HEADER_LENGTH, SECTOR);
    if (backing !== null) {
      const current = Number(this.head.readBigUInt64BE(8));
      const slot = current === NAME_SLOTS[0] ? NAME_SLOTS[1] : NAME_SLOTS[0];
      const name = setBackingFields(head, backing, slot);
      await writeFully(this.handle, name, 0, name.length, slot);
      name.copy(this.head, slot);
      await this.handle.sync();
    }
    await writeFully(this.handle, head, 0, SECTOR, 0);
    head.copy(this.head, 0);
    await this.handle.sync();
  }

  /** The host offset of a guest cluster's data, 0 when the file maps none there. */
  private async hostOf(guest: number): Promise<number> {
    const table = await this.tableOf(Math.floor(guest / L2_ENTRIES), false);
    if (!table) return 0;
    const j = (guest % L2_ENTRIES) * 8;
    const hi = table.entries.readUInt32BE(j);
    const lo = table.entries.readUInt32BE(j + 4);
    if (hi & HI_COMPRESSED) throw new NotOwnQcow2Error('compressed cluster in a qcow2 layer');
    return lo & 1 ? 0 : descriptorOffset(hi, lo);
  }

  private async setEntry(guest: number, host: number, hiFlags: number, loFlags: number): Promise<void> {
    const table = (await this.tableOf(Math.floor(guest / L2_ENTRIES), true)) as Table;
    const j = (guest % L2_ENTRIES) * 8;
    writeU64(table.entries, j, host, hiFlags);
    if (loFlags) table.entries.writeUInt32BE((table.entries.readUInt32BE(j + 4) | loFlags) >>> 0, j + 4);
    table.dirty = true;
    this.changed = true;
  }

  private async tableOf(index: number, create: boolean): Promise<Table | null> {
    let table = this.tables.get(index);
    if (table) return table;
    const offset = index < this.l1.length ? this.l1[index] : 0;
    if (offset === 0 && !create) return null;
    table = {
      offset,
      entries: offset ? await readAt(this.handle, Buffer.alloc(C), offset) : Buffer.alloc(C),
      dirty: false,
    };
    this.tables.set(index, table);
    return table;
  }

  /**
   * Writes, in fresh clusters at the end, refcounts of exactly the clusters
   * the header, L1 and L2 tables reference (1 each: nothing is shared), the
   * refcount structures counting themselves.
   */
  private async writeRefcounts(): Promise<{ offset: number; clusters: number }> {
    const used = new Uint8Array(Math.ceil(this.end / C / 8) + 1);
    const mark = (offset: number) => {
      const c = offset / C;
      used[c >> 3] |= 1 << (c & 7);
    };
    mark(0);
    const l1Clusters = Math.ceil((this.l1.length * 8) / C);
    for (let k = 0; k < l1Clusters; k++) mark(this.l1Offset + k * C);
    for (let i = 0; i < this.l1.length; i++) {
      const offset = this.l1[i];
      if (offset === 0) continue;
      mark(offset);
      const table = this.tables.get(i)?.entries ?? (await readAt(this.handle, Buffer.alloc(C), offset));
      for (let j = 0; j < L2_ENTRIES; j++) {
        const hi = table.readUInt32BE(j * 8);
        const lo = table.readUInt32BE(j * 8 + 4);
        const host = descriptorOffset(hi, lo);
        if (host > 0 && !(hi & HI_COMPRESSED)) mark(host);
      }
    }
    const base = this.end / C;
    let blocks = 1;
    let tableClusters = 1;
    for (;;) {
      const total = base + tableClusters + blocks;
      const b = Math.ceil(total / REFCOUNTS_PER_BLOCK);
      const t = Math.ceil((b * 8) / C);
      if (b <= blocks && t <= tableClusters) break;
      blocks = Math.max(blocks, b);
      tableClusters = Math.max(tableClusters, t);
    }
    const tableOffset = this.end;
    const blocksOffset = tableOffset + tableClusters * C;
    this.end = blocksOffset + blocks * C;
    const total = this.end / C;
    const isUsed = (c: number) => c >= base || (used[c >> 3] & (1 << (c & 7))) !== 0;
    const rt = Buffer.alloc(tableClusters * C);
    const block = Buffer.alloc(C);
    for (let b = 0; b < blocks; b++) {
      writeU64(rt, b * 8, blocksOffset + b * C);
      block.fill(0);
      for (let k = 0; k < REFCOUNTS_PER_BLOCK; k++) {
        const c = b * REFCOUNTS_PER_BLOCK + k;
        if (c >= total) break;
        if (isUsed(c)) block.writeUInt16BE(1, k * 2);
      }
      await writeFully(this.handle, block, 0, C, blocksOffset + b * C);
    }
    await writeFully(this.handle, rt, 0, rt.length, tableOffset);
    return { offset: tableOffset, clusters: tableClusters };
  }
}

/** Writes the backing file fields and format extension into `head` (its first sector); returns the name's bytes, for `slot`. */
function setBackingFields(head: Buffer, backing: string, slot: number): Buffer {
  const name = Buffer.from(backing);
  if (name.length === 0 || name.length > MAX_NAME_BYTES)
    throw new RangeError(`backing file name of ${name.length} bytes`);
  writeU64(head, 8, slot);
  head.writeUInt32BE(name.length, 16);
  head.writeUInt32BE(EXT_BACKING_FORMAT, HEADER_LENGTH);
  head.writeUInt32BE(5, HEADER_LENGTH + 4);
  head.write('qcow2\0\0\0', HEADER_LENGTH + 8, 'latin1');
  head.fill(0, HEADER_LENGTH + 16, HEADER_LENGTH + 24); // end of extensions
  return name;
}

function checkAligned(offset: number): void {
  if (offset % C !== 0) throw new RangeError(`offset ${offset} is not on a ${C}-byte cluster boundary`);
}

function writeU64(buf: Buffer, pos: number, value: number, hiFlags = 0): void {
  buf.writeUInt32BE((Math.floor(value / TWO_POW_32) | hiFlags) >>> 0, pos);
  buf.writeUInt32BE(value % TWO_POW_32, pos + 4);
}
