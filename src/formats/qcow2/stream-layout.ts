/**
 * The qcow2 layout learned as an image streams in (see ../stream-layout.ts).
 *
 * It reads what Qcow2Image.open reads, through the same parser: the header,
 * the L1 table, then the L2 tables in file order. Each L2 table announces its
 * plain data clusters (plainDataOffset: not compressed, not zero). qemu-img
 * and diskport both write every L2 table before the data it maps, so an
 * image from either streams almost entirely into place; data written before
 * its table, compressed clusters and extended L2 entries are left to open().
 */
import { affordable, type HostRange, StreamLayout } from '../stream-layout.js';
import { parseHeader, peekClusterBits, type Qcow2Header, V2_HEADER_LENGTH_BYTES } from './header.js';
import { descriptorOffset, plainDataOffset } from './image.js';

type Step = 'peek' | 'header' | 'l1' | 'l2' | 'done';

export class Qcow2StreamLayout extends StreamLayout {
  private step: Step = 'peek';
  private needRange: HostRange | null = [0, V2_HEADER_LENGTH_BYTES];
  private header: Qcow2Header | null = null;
  /** L2 tables in file order: offsets and the L1 index of each. */
  private tableOffsets = new Float64Array(0);
  private tableIndices = new Uint32Array(0);
  private cursor = 0;

  /**
   * `fileSize`: the upload's length when known before its bytes;
   * `differencing`: an overlay naming a backing file streams its own clusters.
   */
  constructor(
    private readonly fileSize: number | null,
    private readonly opts: { differencing?: boolean } = {},
  ) {
    super();
  }

  protected nextNeed(): HostRange | null {
    if (this.step !== 'l2') return this.needRange;
    if (this.cursor >= this.tableOffsets.length) return null;
    const start = this.tableOffsets[this.cursor];
    return [start, start + (this.header as Qcow2Header).clusterSizeBytes];
  }

  protected learnNeed(bytes: Buffer): void {
    switch (this.step) {
      case 'peek': {
        this.needRange = affordable(0, 2 ** peekClusterBits(bytes));
        this.step = 'header';
        return;
      }
      case 'header': {
        this.learnHeader(bytes);
        return;
      }
      case 'l1': {
        this.learnL1(bytes);
        return;
      }
      case 'l2': {
        this.learnL2(bytes);
        return;
      }
      default:
        return;
    }
  }

  private learnHeader(bytes: Buffer): void {
    const header = parseHeader(bytes, this.fileSize ?? Number.MAX_SAFE_INTEGER, {
      backing: this.opts.differencing,
    });
    // Subcluster bitmaps: rare enough to leave to open().
    if (header.extendedL2) {
      this.disable();
      return;
    }
    this.header = header;
    this.step = 'l1';
    this.needRange = header.l1Entries > 0 ? affordable(header.l1TableOffset, header.l1Entries * 8) : null;
    if (!this.needRange) this.step = 'done';
  }

  private learnL1(l1: Buffer): void {
    const { clusterSizeBytes, l1Entries } = this.header as Qcow2Header;
    const used: number[] = [];
    const offsetOf = (i: number) => descriptorOffset(l1.readUInt32BE(i * 8), l1.readUInt32BE(i * 8 + 4));
    for (let i = 0; i < l1Entries; i++) {
      const offset = offsetOf(i);
      if (offset === 0) continue;
      if (offset % clusterSizeBytes !== 0) {
        this.disable();
        return;
      }
      used.push(i);
    }
    used.sort((a, b) => offsetOf(a) - offsetOf(b));
    this.tableIndices = Uint32Array.from(used);
    this.tableOffsets = Float64Array.from(used, offsetOf);
    for (let k = 1; k < used.length; k++) {
      // A table shared by two L1 entries: open() refuses it.
      if (this.tableOffsets[k] === this.tableOffsets[k - 1]) {
        this.disable();
        return;
      }
    }
    this.step = 'l2';
  }

  private learnL2(table: Buffer): void {
    const { clusterSizeBytes, l2Entries, l2EntryBytes, virtualSizeBytes } = this.header as Qcow2Header;
    const firstGuest = this.tableIndices[this.cursor] * l2Entries * clusterSizeBytes;
    this.cursor++;
    for (let j = 0; j < l2Entries; j++) {
      const guest = firstGuest + j * clusterSizeBytes;
      if (guest >= virtualSizeBytes) break;
      const host = plainDataOffset(
        table.readUInt32BE(j * l2EntryBytes),
        table.readUInt32BE(j * l2EntryBytes + 4),
      );
      if (host < 0 || host % clusterSizeBytes !== 0) continue;
      this.announce(host, guest, Math.min(clusterSizeBytes, virtualSizeBytes - guest));
    }
  }
}
