/**
 * qcow2 header parsing (qemu's docs/interop/qcow2.txt, "Header"): what is
 * read, what is refused as malformed (400) and what as unsupported (422).
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { ApiError } from '../../src/errors.js';
import { parseHeader, QCOW2_MAGIC } from '../../src/formats/qcow2/header.js';

const MiB = 1024 * 1024;
const EXT_FEATURE_NAME_TABLE = 0x6803f857;

interface Fields {
  version?: number;
  clusterBits?: number;
  size?: number;
  l1Entries?: number;
  l1Offset?: number;
  cryptMethod?: number;
  incompatible?: bigint;
  refcountOrder?: number;
  headerLength?: number;
  backing?: { offset: number; name: string };
  compressionType?: number;
  /** Header extensions, written after the header: [type, data]. */
  extensions?: [number, Buffer][];
}

/** A first cluster holding a header with these fields (defaults: v3, 64 KiB clusters, 1 GiB). */
function header(f: Fields = {}): Buffer {
  const clusterBits = f.clusterBits ?? 16;
  const buf = Buffer.alloc(2 ** Math.min(clusterBits, 16));
  const version = f.version ?? 3;
  buf.writeUInt32BE(QCOW2_MAGIC, 0);
  buf.writeUInt32BE(version, 4);
  if (f.backing) {
    buf.writeBigUInt64BE(BigInt(f.backing.offset), 8);
    buf.writeUInt32BE(Buffer.byteLength(f.backing.name), 16);
    buf.write(f.backing.name, f.backing.offset);
  }
  buf.writeUInt32BE(clusterBits, 20);
  buf.writeBigUInt64BE(BigInt(f.size ?? 1024 * MiB), 24);
  buf.writeUInt32BE(f.cryptMethod ?? 0, 32);
  buf.writeUInt32BE(f.l1Entries ?? 2, 36);
  buf.writeBigUInt64BE(BigInt(f.l1Offset ?? 3 * 2 ** clusterBits), 40);
  buf.writeBigUInt64BE(BigInt(2 ** clusterBits), 48);
  buf.writeUInt32BE(1, 56);
  const headerLength = f.headerLength ?? (f.compressionType !== undefined ? 112 : 104);
  if (version === 3) {
    buf.writeBigUInt64BE(f.incompatible ?? 0n, 72);
    buf.writeUInt32BE(f.refcountOrder ?? 4, 96);
    buf.writeUInt32BE(headerLength, 100);
    if (f.compressionType !== undefined) buf[104] = f.compressionType;
  }
  let at = version === 3 ? headerLength : 72;
  for (const [type, data] of f.extensions ?? []) {
    buf.writeUInt32BE(type, at);
    buf.writeUInt32BE(data.length, at + 4);
    data.copy(buf, at + 8);
    at += 8 + Math.ceil(data.length / 8) * 8;
  }
  return buf;
}

const FILE_SIZE = 100 * MiB;

describe('parseHeader reads', () => {
  test('a version 3 header', () => {
    assert.deepEqual(parseHeader(header(), FILE_SIZE), {
      version: 3,
      clusterBits: 16,
      clusterSizeBytes: 65536,
      virtualSizeBytes: 1024 * MiB,
      l1Entries: 2,
      l1TableOffset: 3 * 65536,
      l2Entries: 8192,
      l2EntryBytes: 8,
      extendedL2: false,
      dirty: false,
      backingFile: null,
    });
  });
  test('a version 2 header (72 bytes, no feature bits)', () => {
    const h = parseHeader(header({ version: 2, clusterBits: 12, size: 8 * MiB, l1Entries: 16 }), FILE_SIZE);
    assert.equal(h.version, 2);
    assert.equal(h.clusterSizeBytes, 4096);
    assert.equal(h.l2Entries, 512);
    assert.equal(h.l1Entries, 4, 'only the entries the disk needs');
  });
  test('a dirty image (refcounts may be stale; a reader does not care)', () => {
    assert.equal(parseHeader(header({ incompatible: 1n }), FILE_SIZE).dirty, true);
  });
  test('extended L2 entries: 16 bytes each, half as many per table', () => {
    const h = parseHeader(header({ incompatible: 1n << 4n, l1Entries: 4 }), FILE_SIZE);
    assert.deepEqual([h.extendedL2, h.l2EntryBytes, h.l2Entries], [true, 16, 4096]);
  });
  test("an overlay's backing file name, when a delta import allows one; an unreadable name is 400", () => {
    const h = parseHeader(header({ backing: { offset: 1024, name: 'base.qcow2' } }), FILE_SIZE, {
      backing: true,
    });
    assert.equal(h.backingFile, 'base.qcow2');
    const outside = header({ backing: { offset: 1024, name: 'base.qcow2' } });
    outside.writeBigUInt64BE(BigInt(outside.length), 8);
    assert.throws(
      () => parseHeader(outside, FILE_SIZE, { backing: true }),
      (err: unknown) =>
        err instanceof ApiError && err.status === 400 && /backing file name/.test(err.message),
    );
  });
  test('an empty disk needs no L1 table', () => {
    const h = parseHeader(header({ size: 0, l1Entries: 0, l1Offset: 0 }), FILE_SIZE);
    assert.deepEqual([h.virtualSizeBytes, h.l1Entries, h.l1TableOffset], [0, 0, 0]);
  });
  test('512-byte clusters, the smallest', () => {
    const h = parseHeader(header({ clusterBits: 9, size: MiB, l1Entries: 64, l1Offset: 512 * 3 }), FILE_SIZE);
    assert.deepEqual([h.clusterSizeBytes, h.l2Entries, h.l1Entries], [512, 64, 32]);
  });
});

describe('parseHeader refuses', () => {
  const featureNames = Buffer.alloc(48);
  featureNames[0] = 0; // incompatible
  featureNames[1] = 9;
  featureNames.write('frobnicated', 2);
  const cases: { name: string; head: Buffer; fileSize?: number; status: number; message: RegExp }[] = [
    {
      name: 'a short file',
      head: header().subarray(0, 50),
      status: 400,
      message: /shorter than a qcow2 header/,
    },
    { name: 'a bad magic', head: Buffer.alloc(512, 0x51), status: 400, message: /bad magic/ },
    { name: 'version 1', head: header({ version: 1 }), status: 422, message: /version 1/ },
    { name: 'version 4', head: header({ version: 4 }), status: 422, message: /version 4/ },
    {
      name: 'clusters below 512 bytes',
      head: header({ clusterBits: 8 }),
      status: 400,
      message: /cluster_bits 8/,
    },
    { name: 'clusters above 2 MiB', head: header({ clusterBits: 22 }), status: 422, message: /2 MiB limit/ },
    {
      name: 'a v3 header cut short',
      head: header().subarray(0, 100),
      status: 400,
      message: /version 3 header/,
    },
    {
      name: 'a header_length not a multiple of 8',
      head: header({ headerLength: 106 }),
      status: 400,
      message: /header_length 106/,
    },
    {
      name: 'a header_length below 104',
      head: header({ headerLength: 96 }),
      status: 400,
      message: /header_length 96/,
    },
    {
      name: 'refcount_order 7',
      head: header({ refcountOrder: 7 }),
      status: 400,
      message: /refcount_order 7/,
    },
    {
      name: 'a backing file, named',
      head: header({ backing: { offset: 1024, name: 'base.qcow2' } }),
      status: 422,
      message: /backing file 'base.qcow2'/,
    },
    { name: 'AES encryption', head: header({ cryptMethod: 1 }), status: 422, message: /encryption \(AES\)/ },
    {
      name: 'LUKS encryption',
      head: header({ cryptMethod: 2 }),
      status: 422,
      message: /encryption \(LUKS\)/,
    },
    {
      name: 'an external data file',
      head: header({ incompatible: 1n << 2n }),
      status: 422,
      message: /external data file/,
    },
    {
      name: 'a corrupt mark',
      head: header({ incompatible: 1n << 1n }),
      status: 422,
      message: /marked corrupt/,
    },
    {
      name: 'an unknown incompatible feature, named from the feature table',
      head: header({ incompatible: 1n << 9n, extensions: [[EXT_FEATURE_NAME_TABLE, featureNames]] }),
      status: 422,
      message: /feature bit\(s\) 9 \(frobnicated\)/,
    },
    {
      name: 'zstd compression',
      head: header({ incompatible: 1n << 3n, compressionType: 1 }),
      status: 422,
      message: /zstd compression/,
    },
    {
      name: 'the compression bit with zlib named',
      head: header({ incompatible: 1n << 3n, compressionType: 0 }),
      status: 400,
      message: /compression type bit is set/,
    },
    {
      name: 'a compression type without its bit',
      head: header({ compressionType: 1 }),
      status: 400,
      message: /compression_type 1 without/,
    },
    {
      name: 'extended L2 entries with small clusters',
      head: header({ clusterBits: 12, incompatible: 1n << 4n, l1Entries: 4096 }),
      status: 400,
      message: /16 KiB or more/,
    },
    {
      name: 'a header extension running past the first cluster',
      head: (() => {
        const h = header();
        h.writeUInt32BE(0x12345678, 104);
        h.writeUInt32BE(70_000, 108);
        return h;
      })(),
      status: 400,
      message: /runs past the first cluster/,
    },
    {
      name: 'a disk larger than 64 TiB',
      head: header({ size: 65 * 1024 ** 4 }),
      status: 413,
      message: /exceeds/,
    },
    {
      name: 'an L1 table too small for the disk',
      head: header({ l1Entries: 1 }),
      status: 400,
      message: /too small/,
    },
    {
      name: 'an L1 table off a cluster boundary',
      head: header({ l1Offset: 65536 + 8 }),
      status: 400,
      message: /not a non-zero cluster/,
    },
    {
      name: 'an L1 table at offset 0',
      head: header({ l1Offset: 0 }),
      status: 400,
      message: /not a non-zero cluster/,
    },
    {
      name: 'an L1 table past the end of the file',
      head: header({ l1Offset: 10 * 65536 }),
      fileSize: 10 * 65536 + 8,
      status: 400,
      message: /runs past the end/,
    },
    {
      name: 'an L1 offset beyond any file',
      head: header({ l1Offset: 2 ** 52 }),
      status: 400,
      message: /beyond the end/,
    },
  ];
  for (const c of cases) {
    test(`${c.name}: ${c.status}`, () => {
      assert.throws(
        () => parseHeader(c.head, c.fileSize ?? FILE_SIZE),
        (err: unknown) => {
          assert.ok(err instanceof ApiError, String(err));
          assert.equal(err.status, c.status, err.message);
          assert.match(err.message, c.message);
          return true;
        },
      );
    });
  }
});
