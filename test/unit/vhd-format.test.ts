/** VHD footer and header fields: checksums, CHS geometry, and the virtual size qemu-img would report. */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  bitmapBytesOnDisk,
  buildDynamicHeader,
  buildFooter,
  chsGeometry,
  DISK_TYPE_DYNAMIC,
  DISK_TYPE_FIXED,
  FOOTER_OFFSETS,
  footerVirtualSize,
  MAX_CHS_SECTORS,
  parseDynamicHeader,
  parseFooter,
  vhdChecksum,
} from '../../src/formats/vhd/format.js';

const MiB = 1024 * 1024;

describe('chsGeometry (the specification\'s "CHS Calculation")', () => {
  // Geometries `qemu-img create -f vpc` wrote for these sector counts (its own
  // calculate_geometry): an exact count must come back as that geometry.
  const qemu: [sectors: number, cylinders: number, heads: number, sectorsPerTrack: number][] = [
    [2108, 31, 4, 17],
    [20536, 302, 4, 17],
    [81940, 964, 5, 17],
    [2097648, 2081, 16, 63],
    [5859504, 5813, 16, 63],
    [266338320, 65279, 16, 255],
    [MAX_CHS_SECTORS, 65535, 16, 255],
  ];
  for (const [sectors, cylinders, heads, sectorsPerTrack] of qemu) {
    test(`${sectors} sectors: ${cylinders}/${heads}/${sectorsPerTrack}, as qemu writes it`, () => {
      assert.deepEqual(chsGeometry(sectors), { cylinders, heads, sectorsPerTrack });
    });
  }
  test('a size CHS cannot express rounds down, never up', () => {
    for (const sectors of [2048, 20480, 81934, 2097152, (4 * 1024 ** 3) / 512, MAX_CHS_SECTORS + 1000]) {
      const g = chsGeometry(sectors);
      const chs = g.cylinders * g.heads * g.sectorsPerTrack;
      assert.ok(chs <= sectors, `${sectors}: ${JSON.stringify(g)}`);
      assert.ok(g.heads <= 16 && g.sectorsPerTrack <= 255 && g.cylinders <= 65535, JSON.stringify(g));
    }
  });
});

describe('footerVirtualSize: what qemu-img info reports', () => {
  const footer = (creatorApp: string, currentSize: number, geometry: [number, number, number]) => {
    const buf = buildFooter({
      virtualSizeBytes: 0,
      diskType: DISK_TYPE_DYNAMIC,
      dataOffset: 512,
      creatorApp,
      creatorOs: 'Wi2k',
      uuid: Buffer.alloc(16),
    });
    buf.writeBigUInt64BE(BigInt(currentSize), FOOTER_OFFSETS.currentSize);
    buf.writeUInt16BE(geometry[0], FOOTER_OFFSETS.cylinders);
    buf.writeUInt8(geometry[1], FOOTER_OFFSETS.heads);
    buf.writeUInt8(geometry[2], FOOTER_OFFSETS.sectorsPerTrack);
    return parseFooter(buf);
  };
  const cases: { creator: string; current: number; geometry: [number, number, number]; size: number }[] = [
    // Virtual PC and plain qemu: the geometry decides, Current Size is ignored.
    { creator: 'vpc ', current: 10 * MiB, geometry: [302, 4, 17], size: 20536 * 512 },
    { creator: 'qemu', current: MiB, geometry: [31, 4, 17], size: 2108 * 512 },
    // Hyper-V, qemu with force_size, Disk2vhd, XenConverter, XenServer: Current Size.
    { creator: 'win ', current: 10 * MiB, geometry: [302, 4, 17], size: 10 * MiB },
    { creator: 'qem2', current: 10 * MiB + 7, geometry: [302, 4, 17], size: 10 * MiB },
    { creator: 'd2v ', current: 3 * MiB, geometry: [1, 1, 1], size: 3 * MiB },
    { creator: 'CTXS', current: 5 * MiB, geometry: [1, 1, 1], size: 5 * MiB },
    { creator: 'tap\0', current: 7 * MiB, geometry: [1, 1, 1], size: 7 * MiB },
    // The largest geometry means "larger than CHS can say": Current Size, whoever wrote it.
    { creator: 'vpc ', current: 3000 * 1024 ** 3, geometry: [65535, 16, 255], size: 3000 * 1024 ** 3 },
  ];
  for (const c of cases) {
    test(`creator '${c.creator.replace('\0', '\\0')}', Current Size ${c.current}, CHS ${c.geometry.join('/')}: ${c.size} bytes`, () => {
      assert.equal(footerVirtualSize(footer(c.creator, c.current, c.geometry)), BigInt(c.size));
    });
  }
});

describe('footers and headers as written and read back', () => {
  test('a built footer parses to its fields, with a checksum that verifies', () => {
    const uuid = Buffer.from('00112233445566778899aabbccddeeff', 'hex');
    const buf = buildFooter({
      virtualSizeBytes: 40 * MiB,
      diskType: DISK_TYPE_FIXED,
      dataOffset: -1 >>> 0,
      creatorApp: 'win ',
      creatorOs: 'Wi2k',
      uuid,
    });
    assert.equal(buf.length, 512);
    const f = parseFooter(buf);
    assert.equal(f.cookie, 'conectix');
    assert.equal(f.creatorApp, 'win ');
    assert.equal(f.diskType, DISK_TYPE_FIXED);
    assert.equal(f.currentSize, BigInt(40 * MiB));
    assert.equal(f.originalSize, BigInt(40 * MiB));
    assert.equal(f.checksum, f.computedChecksum);
    assert.ok(buf.subarray(68, 84).equals(uuid));
    assert.equal(footerVirtualSize(f), BigInt(40 * MiB));
  });
  test('one flipped bit anywhere in a footer breaks its checksum', () => {
    const buf = buildFooter({
      virtualSizeBytes: MiB,
      diskType: DISK_TYPE_DYNAMIC,
      dataOffset: 512,
      creatorApp: 'win ',
      creatorOs: 'Wi2k',
      uuid: Buffer.alloc(16, 7),
    });
    for (const at of [0, 16, 48, 60, 100, 511]) {
      const bad = Buffer.from(buf);
      bad[at] ^= 0x10;
      const f = parseFooter(bad);
      assert.notEqual(f.checksum, f.computedChecksum, `byte ${at}`);
    }
  });
  test("the checksum is the one's complement of the byte sum, without its own four bytes", () => {
    const buf = Buffer.alloc(16);
    buf.set([1, 2, 3, 0xff, 0xff, 0xff, 0xff, 4], 0);
    assert.equal(vhdChecksum(buf, 3), ~(1 + 2 + 3 + 4) >>> 0);
    assert.equal(vhdChecksum(Buffer.alloc(8), 0), 0xffffffff);
  });
  test('a built dynamic header parses to its fields', () => {
    const h = parseDynamicHeader(buildDynamicHeader(1536, 20, 2 * MiB));
    assert.equal(h.cookie, 'cxsparse');
    assert.equal(h.tableOffset, 1536n);
    assert.equal(h.maxTableEntries, 20);
    assert.equal(h.blockSizeBytes, 2 * MiB);
    assert.equal(h.checksum, h.computedChecksum);
  });
});

describe('bitmapBytesOnDisk: one bit per sector, padded to whole sectors', () => {
  const cases: [blockSize: number, bytes: number][] = [
    [2 * MiB, 512],
    [512 * 1024, 512],
    [4096, 512],
    [4 * MiB, 1024],
    [16 * MiB, 4096],
  ];
  for (const [blockSize, bytes] of cases) {
    test(`${blockSize}-byte blocks: ${bytes} bytes`, () => assert.equal(bitmapBytesOnDisk(blockSize), bytes));
  }
});
