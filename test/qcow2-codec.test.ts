/**
 * The qcow2 codec against qemu-img, the outside judge: images that qemu-img
 * writes (v2 and v3, compressed, 512 B to 2 MiB clusters, extended L2, zero
 * clusters) open and read back byte for byte; images it cannot honour are
 * refused with 422 naming the feature; and what we export passes
 * `qemu-img check` and `qemu-img compare`.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { open as openFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { ApiError } from '../src/errors.js';
import { parseHeader } from '../src/formats/qcow2/header.js';
import { Qcow2Image, qcow2Codec } from '../src/formats/qcow2/index.js';
import type { SerializedImage } from '../src/formats/types.js';
import type { BlockImage, Extent } from '../src/image/block-image.js';
import { RawFileImage } from '../src/image/raw-file-image.js';
import { isZero } from '../src/image/zero.js';
import { prng } from './helpers/random.js';

const MiB = 1024 * 1024;
const QEMU_IMG = '/usr/bin/qemu-img';

/** Random bytes; every other block is low-entropy so that `qemu-img convert -c` really compresses. */
function randomBytes(rand: () => number, length: number, compressible: boolean): Buffer {
  const buf = Buffer.allocUnsafe(length);
  const mask = compressible ? 0x03030303 : 0xffffffff;
  let i = 0;
  for (; i + 4 <= length; i += 4) buf.writeUInt32LE(((rand() * 4294967296) & mask) >>> 0, i);
  for (; i < length; i++) buf[i] = Math.floor(rand() * 256) & mask & 0xff;
  return buf;
}

/**
 * A sparse raw file of `size` bytes with `pieces` random pieces of data at
 * 512-byte-aligned offsets (so pieces start and end mid-cluster).
 */
function makeRaw(path: string, size: number, seed: number, pieces: number, maxPieceBytes: number): void {
  const rand = prng(seed);
  const fd = openSync(path, 'w');
  try {
    for (let p = 0; p < pieces; p++) {
      const length = Math.min(size, 512 * (1 + Math.floor((rand() * maxPieceBytes) / 512)));
      const start = 512 * Math.floor((rand() * (size - length)) / 512);
      writeSync(fd, randomBytes(rand, length, p % 2 === 0), 0, length, start);
    }
  } finally {
    closeSync(fd);
  }
  execFileSync('truncate', ['-s', String(size), path]);
}

function makeDenseRaw(path: string, size: number, seed: number): void {
  writeFileSync(path, randomBytes(prng(seed), size, false));
}

function qemuImg(...args: string[]): string {
  return execFileSync(QEMU_IMG, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

function qemuIo(...args: string[]): boolean {
  const r = spawnSync('qemu-io', args, { encoding: 'utf8' });
  return r.status === 0 && !/error|failed/i.test(r.stderr + r.stdout);
}

function assertCovers(extents: readonly Extent[], size: number): void {
  let pos = 0;
  for (const [i, e] of extents.entries()) {
    assert.equal(e.start, pos, `extent ${i} starts where the previous one ends`);
    assert.ok(e.length > 0, `extent ${i} is not empty`);
    if (i > 0) assert.notEqual(e.zero, extents[i - 1].zero, `extent ${i} is merged with its neighbour`);
    pos += e.length;
  }
  assert.equal(pos, size, 'extents cover the disk exactly once');
}

/** Reads every byte of `image` and checks it against `raw`; zero extents must be zeros there. */
async function assertSameAsRaw(image: BlockImage, raw: Buffer, seed: number): Promise<void> {
  assert.equal(image.virtualSize, raw.length);
  const chunk = 4 * MiB;
  for (let pos = 0; pos < raw.length; pos += chunk) {
    const got = await image.read(pos, chunk);
    const want = raw.subarray(pos, pos + chunk);
    assert.ok(got.equals(want), `bytes at ${pos} differ`);
  }
  const rand = prng(seed);
  for (let i = 0; i < 40; i++) {
    const start = Math.floor(rand() * raw.length);
    const length = Math.floor(rand() * 300_000);
    const got = await image.read(start, length);
    assert.ok(got.equals(raw.subarray(start, start + length)), `read(${start}, ${length}) differs`);
  }
  const extents = await image.extents();
  assertCovers(extents, raw.length);
  for (const e of extents) {
    if (!e.zero) continue;
    assert.ok(
      isZero(raw, e.start, e.start + e.length),
      `zero extent at ${e.start} reads as zeros in the raw`,
    );
  }
}

async function collect(s: SerializedImage, start = 0, end = s.size): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const b of s.read(start, end)) parts.push(b);
  return Buffer.concat(parts);
}

async function writeStream(s: SerializedImage, path: string): Promise<void> {
  const h = await openFile(path, 'w');
  try {
    let pos = 0;
    for await (const b of s.read(0, s.size)) {
      await h.write(b, 0, b.length, pos);
      pos += b.length;
    }
    await h.truncate(s.size);
  } finally {
    await h.close();
  }
}

async function assertRefused(path: string, status: number, pattern: RegExp): Promise<void> {
  await assert.rejects(qcow2Codec.open(path), (err: unknown) => {
    assert.ok(err instanceof ApiError, `an ApiError, not ${String(err)}`);
    assert.equal(err.status, status, err.message);
    assert.match(err.message, pattern);
    return true;
  });
}

let dir: string;
before(() => {
  dir = mkdtempSync(join(tmpdir(), 'qcow2-codec-'));
});
after(() => {
  rmSync(dir, { recursive: true, force: true });
});

describe('opening images written by qemu-img', () => {
  const ODD_SIZE_BYTES = 100 * MiB + 7 * 512;
  const cases: { name: string; size: number; dense?: boolean; opts: string[]; compressed?: boolean }[] = [
    { name: 'v3, 64 KiB clusters, sparse, odd size', size: ODD_SIZE_BYTES, opts: ['-o', 'compat=1.1'] },
    { name: 'v2 (compat=0.10), sparse, odd size', size: ODD_SIZE_BYTES, opts: ['-o', 'compat=0.10'] },
    {
      name: 'v3, zlib-compressed clusters',
      size: ODD_SIZE_BYTES,
      opts: ['-c', '-o', 'compat=1.1'],
      compressed: true,
    },
    {
      name: 'v2, zlib-compressed clusters',
      size: 40 * MiB,
      opts: ['-c', '-o', 'compat=0.10'],
      compressed: true,
    },
    { name: '512-byte clusters', size: 24 * MiB + 512, opts: ['-o', 'cluster_size=512'] },
    {
      name: '512-byte clusters, compressed',
      size: 8 * MiB,
      opts: ['-c', '-o', 'cluster_size=512'],
      compressed: true,
    },
    { name: '2 MiB clusters', size: ODD_SIZE_BYTES, opts: ['-o', 'cluster_size=2097152'] },
    {
      name: '2 MiB clusters, compressed',
      size: 48 * MiB,
      opts: ['-c', '-o', 'cluster_size=2097152'],
      compressed: true,
    },
    { name: 'extended L2 entries', size: ODD_SIZE_BYTES, opts: ['-o', 'extended_l2=on'] },
    { name: 'dense 64 KiB clusters', size: 16 * MiB, dense: true, opts: [] },
    { name: 'dense 512-byte clusters', size: 4 * MiB, dense: true, opts: ['-o', 'cluster_size=512'] },
  ];
  for (const [i, c] of cases.entries()) {
    it(`reads back ${c.name} byte for byte, with exact extents`, async () => {
      const raw = join(dir, `open-${i}.raw`);
      const img = join(dir, `open-${i}.qcow2`);
      if (c.dense) makeDenseRaw(raw, c.size, 100 + i);
      else makeRaw(raw, c.size, 100 + i, 24, 600 * 1024);
      qemuImg('convert', '-f', 'raw', '-O', 'qcow2', ...c.opts, raw, img);
      if (c.compressed) {
        const check = JSON.parse(qemuImg('check', '--output=json', img));
        assert.ok(check['compressed-clusters'] > 0, 'qemu-img really wrote compressed clusters');
      }
      const image = await qcow2Codec.open(img);
      try {
        await assertSameAsRaw(image, readFileSync(raw), 7 + i);
      } finally {
        await image.close();
      }
    });
  }

  it('reads zero clusters (v3 bit 0) and unallocated clusters as zeros', async (t) => {
    const img = join(dir, 'zero.qcow2');
    qemuImg('create', '-f', 'qcow2', '-o', 'compat=1.1', img, '8M');
    const ok = qemuIo(
      '-f',
      'qcow2',
      '-c',
      'write -P 0xab 0 4M',
      '-c',
      'write -z 1M 1M',
      '-c',
      'write -z -u 3M 64k',
      '-c',
      'write -z 6M 64k',
      img,
    );
    if (!ok) {
      t.skip('qemu-io cannot write zero clusters here');
      return;
    }
    const want = Buffer.alloc(8 * MiB);
    want.fill(0xab, 0, 4 * MiB);
    want.fill(0, 1 * MiB, 2 * MiB);
    want.fill(0, 3 * MiB, 3 * MiB + 65536);
    const image = await qcow2Codec.open(img);
    try {
      await assertSameAsRaw(image, want, 3);
      const extents = await image.extents();
      assert.deepEqual(
        extents.map((e) => [e.start / 65536, e.length / 65536, e.zero]),
        [
          [0, 16, false],
          [16, 16, true],
          [32, 16, false],
          [48, 1, true],
          [49, 15, false],
          [64, 64, true],
        ],
      );
    } finally {
      await image.close();
    }
  });

  it('accepts a dirty image (stale refcounts do not matter to a reader)', async () => {
    const raw = join(dir, 'dirty.raw');
    const img = join(dir, 'dirty.qcow2');
    makeRaw(raw, 8 * MiB, 5, 4, 100_000);
    qemuImg('convert', '-O', 'qcow2', '-o', 'compat=1.1', raw, img);
    patchU64(img, 72, 1n);
    const image = await qcow2Codec.open(img);
    try {
      await assertSameAsRaw(image, readFileSync(raw), 5);
    } finally {
      await image.close();
    }
  });

  it('answers many concurrent reads of compressed clusters with the bytes qemu-img converts them to', async () => {
    const raw = join(dir, 'concurrent.raw');
    const img = join(dir, 'concurrent.qcow2');
    const oracle = join(dir, 'concurrent-oracle.raw');
    // Half the pieces compress, half do not: reads mix inflated and plain clusters.
    makeRaw(raw, 8 * MiB, 31, 24, 300_000);
    qemuImg('convert', '-c', '-O', 'qcow2', '-o', 'cluster_size=4096', raw, img);
    const check = JSON.parse(qemuImg('check', '--output=json', img)) as Record<string, number>;
    assert.ok(check['compressed-clusters'] > 200, `${check['compressed-clusters']} compressed clusters`);
    qemuImg('convert', '-O', 'raw', img, oracle);
    const want = readFileSync(oracle);
    const image = await qcow2Codec.open(img);
    try {
      const data = (await image.extents()).filter((e) => !e.zero);
      const rand = prng(32);
      // Each read starts mid-cluster inside data and crosses one to three
      // cluster boundaries; all are issued before any is awaited.
      const reads = Array.from({ length: 400 }, () => {
        const e = data[Math.floor(rand() * data.length)];
        const start = e.start + Math.floor(rand() * e.length);
        return [start, 1 + Math.floor(rand() * 3 * 4096)] as const;
      });
      const got = await Promise.all(reads.map(([start, length]) => image.read(start, length)));
      for (const [i, [start, length]] of reads.entries()) {
        assert.ok(got[i].equals(want.subarray(start, start + length)), `read(${start}, ${length})`);
      }
    } finally {
      await image.close();
    }
  });

  it('opens read side only: no write, zero or flush to call (qcow2 at rest is written by serialize)', async () => {
    const img = join(dir, 'ro.qcow2');
    qemuImg('create', '-f', 'qcow2', img, '1M');
    const image = await qcow2Codec.open(img);
    try {
      for (const method of ['write', 'zero', 'flush']) assert.ok(!(method in image), method);
    } finally {
      await image.close();
    }
  });
});

function patchU64(path: string, offset: number, value: bigint): void {
  const fd = openSync(path, 'r+');
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(value);
  writeSync(fd, b, 0, 8, offset);
  closeSync(fd);
}

function patchU32(path: string, offset: number, value: number): void {
  const fd = openSync(path, 'r+');
  const b = Buffer.alloc(4);
  b.writeUInt32BE(value);
  writeSync(fd, b, 0, 4, offset);
  closeSync(fd);
}

describe('refusing images diskport cannot honour', () => {
  it('refuses a backing file with 422 naming it', async () => {
    const base = join(dir, 'base.qcow2');
    const over = join(dir, 'overlay.qcow2');
    qemuImg('create', '-f', 'qcow2', base, '4M');
    qemuImg('create', '-f', 'qcow2', '-b', base, '-F', 'qcow2', over);
    await assertRefused(over, 422, /backing file '.*base\.qcow2' \(qcow2\)/);
  });

  it('refuses LUKS encryption with 422', async () => {
    const img = join(dir, 'luks.qcow2');
    // LUKS key derivation is timed; on a loaded machine qemu-img may fail to
    // measure it ("Unable to get accurate CPU usage"): then set crypt_method by hand.
    const made = ['100'].some(
      (ms) =>
        spawnSync(QEMU_IMG, [
          'create',
          '--object',
          'secret,id=sec0,data=diskport-test',
          '-f',
          'qcow2',
          '-o',
          `encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=${ms}`,
          img,
          '4M',
        ]).status === 0,
    );
    if (!made) {
      qemuImg('create', '-f', 'qcow2', img, '4M');
      patchU32(img, 32, 2);
    }
    await assertRefused(img, 422, /encryption \(LUKS\)/);
  });

  it('refuses AES encryption with 422', async () => {
    const img = join(dir, 'aes.qcow2');
    const made = spawnSync(QEMU_IMG, [
      'create',
      '--object',
      'secret,id=sec0,data=diskport-test',
      '-f',
      'qcow2',
      '-o',
      'encrypt.format=aes,encrypt.key-secret=sec0',
      img,
      '4M',
    ]);
    if (made.status !== 0) {
      // This qemu no longer creates AES images: set crypt_method by hand.
      qemuImg('create', '-f', 'qcow2', img, '4M');
      patchU32(img, 32, 1);
    }
    await assertRefused(img, 422, /encryption \(AES\)/);
  });

  it('refuses an external data file with 422', async () => {
    const img = join(dir, 'datafile.qcow2');
    qemuImg('create', '-f', 'qcow2', '-o', `data_file=${join(dir, 'datafile.raw')}`, img, '4M');
    await assertRefused(img, 422, /external data file '.*datafile\.raw'/);
  });

  it('refuses an unknown incompatible feature bit with 422 naming the bit', async () => {
    const img = join(dir, 'unknown.qcow2');
    qemuImg('create', '-f', 'qcow2', img, '4M');
    patchU64(img, 72, 1n << 37n);
    await assertRefused(img, 422, /unknown incompatible feature bit\(s\) 37/);
  });

  it('refuses an image marked corrupt with 422', async () => {
    const img = join(dir, 'corrupt.qcow2');
    qemuImg('create', '-f', 'qcow2', img, '4M');
    patchU64(img, 72, 2n);
    await assertRefused(img, 422, /marked corrupt/);
  });

  it('refuses zstd compression with 422', async (t) => {
    const img = join(dir, 'zstd.qcow2');
    const made = spawnSync(QEMU_IMG, ['create', '-f', 'qcow2', '-o', 'compression_type=zstd', img, '4M']);
    if (made.status !== 0) {
      t.skip('this qemu-img has no zstd');
      return;
    }
    await assertRefused(img, 422, /zstd compression/);
  });

  it('refuses qcow version 1 with 422 and a raw file with 400', async () => {
    const v1 = join(dir, 'v1.qcow');
    qemuImg('create', '-f', 'qcow', v1, '4M');
    await assertRefused(v1, 422, /version 1/);
    const raw = join(dir, 'notqcow.raw');
    makeRaw(raw, MiB, 1, 2, 10_000);
    await assertRefused(raw, 400, /bad magic/);
  });

  it('refuses a virtual size over 64 TiB with 413', async () => {
    const img = join(dir, 'huge.qcow2');
    qemuImg('create', '-f', 'qcow2', '-o', 'cluster_size=2M', img, '65T');
    await assertRefused(img, 413, /exceeds the 64 TiB limit/);
  });
});

interface Checked {
  'check-errors': number;
  corruptions?: number;
  leaks?: number;
}

async function assertQemuAccepts(out: string, raw: string, size: number): Promise<void> {
  const check = JSON.parse(qemuImg('check', '--output=json', out)) as Checked;
  assert.equal(check['check-errors'], 0);
  assert.equal(check.corruptions ?? 0, 0, 'no corruptions');
  assert.equal(check.leaks ?? 0, 0, 'no leaked clusters');
  assert.match(qemuImg('compare', '-f', 'qcow2', '-F', 'raw', out, raw), /Images are identical/);
  const info = JSON.parse(qemuImg('info', '--output=json', out));
  assert.equal(info['virtual-size'], size);
  assert.equal(info['format-specific'].data.compat, '1.1');
  assert.equal(info['cluster-size'], 65536);
}

describe('serializing to qcow2', () => {
  const cases: { name: string; size: number; make: (path: string) => void }[] = [
    {
      name: 'a sparse disk of odd size',
      size: 100 * MiB + 7 * 512,
      make: (p) => makeRaw(p, 100 * MiB + 7 * 512, 41, 30, 500_000),
    },
    { name: 'a dense disk', size: 24 * MiB, make: (p) => makeDenseRaw(p, 24 * MiB, 42) },
    {
      name: 'an all-zero disk',
      size: 3 * MiB,
      make: (p) => execFileSync('truncate', ['-s', String(3 * MiB), p]),
    },
    {
      name: 'a disk whose last cluster is partial',
      size: 5 * MiB + 1536,
      make: (p) => {
        makeRaw(p, 5 * MiB + 1536, 43, 3, 40_000);
        const fd = openSync(p, 'r+');
        writeSync(fd, Buffer.alloc(1000, 0x5a), 0, 1000, 5 * MiB + 536);
        closeSync(fd);
      },
    },
  ];
  for (const [i, c] of cases.entries()) {
    it(`exports ${c.name} that qemu-img checks clean and compares equal`, async () => {
      const raw = join(dir, `ser-${i}.raw`);
      const out = join(dir, `ser-${i}.qcow2`);
      c.make(raw);
      const source = await RawFileImage.open(raw);
      try {
        const s = await qcow2Codec.serialize(source);
        await writeStream(s, out);
        await assertQemuAccepts(out, raw, c.size);
        // And we read our own output back.
        const back = await qcow2Codec.open(out);
        try {
          await assertSameAsRaw(back, readFileSync(raw), i);
        } finally {
          await back.close();
        }
      } finally {
        await source.close();
      }
    });
  }

  it('produces any range without the bytes before it, and the same bytes every time', async () => {
    const raw = join(dir, 'ranges.raw');
    makeRaw(raw, 40 * MiB + 512, 77, 20, 700_000);
    const source = await RawFileImage.open(raw);
    try {
      const s = await qcow2Codec.serialize(source);
      const whole = await collect(s);
      assert.equal(whole.length, s.size, 'size is exact');
      const again = await collect(await qcow2Codec.serialize(source));
      assert.equal(
        createHash('sha256').update(again).digest('hex'),
        createHash('sha256').update(whole).digest('hex'),
        'two serializations are byte-identical',
      );
      const rand = prng(2024);
      for (let i = 0; i < 200; i++) {
        const a = Math.floor(rand() * (s.size + 1));
        const b =
          i % 4 === 0 ? Math.min(s.size, a + Math.floor(rand() * 1000)) : Math.floor(rand() * (s.size + 1));
        const [start, end] = a <= b ? [a, b] : [b, a];
        const got = await collect(s, start, end);
        assert.ok(got.equals(whole.subarray(start, end)), `read(${start}, ${end})`);
      }
    } finally {
      await source.close();
    }
  });

  it('re-exports an imported compressed qcow2 image', async () => {
    const raw = join(dir, 'reexport.raw');
    const compressed = join(dir, 'reexport-c.qcow2');
    const out = join(dir, 'reexport.qcow2');
    makeRaw(raw, 30 * MiB, 88, 12, 400_000);
    qemuImg('convert', '-c', '-O', 'qcow2', '-o', 'cluster_size=4096', raw, compressed);
    const source = await Qcow2Image.open(compressed);
    try {
      await writeStream(await qcow2Codec.serialize(source), out);
      await assertQemuAccepts(out, raw, 30 * MiB);
    } finally {
      await source.close();
    }
  });

  it('exports a 2 TiB sparse disk with 3 MiB of data quickly, in a file proportional to the data', async () => {
    const TiB = 1024 * MiB * 1024;
    const raw = join(dir, 'big.raw');
    const out = join(dir, 'big.qcow2');
    execFileSync('truncate', ['-s', String(2 * TiB), raw]);
    const fd = openSync(raw, 'r+');
    const rand = prng(9);
    for (const at of [0, 1 * TiB + 12345 * 512, 2 * TiB - MiB]) {
      writeSync(fd, randomBytes(rand, MiB, false), 0, MiB, at);
    }
    closeSync(fd);
    const started = Date.now();
    const source = await RawFileImage.open(raw);
    try {
      const s = await qcow2Codec.serialize(source);
      assert.ok(s.size < 6 * MiB, `export of ${s.size} bytes`);
      await writeStream(s, out);
    } finally {
      await source.close();
    }
    assert.ok(Date.now() - started < 5000, 'serialized in under 5 s');
    await assertQemuAccepts(out, raw, 2 * TiB);
    const back = await qcow2Codec.open(out);
    try {
      const extents = await back.extents();
      assertCovers(extents, 2 * TiB);
      assert.equal(
        extents.filter((e) => !e.zero).reduce((n, e) => n + e.length, 0),
        3 * MiB + 65536,
        'data clusters only (the middle piece straddles a cluster boundary)',
      );
    } finally {
      await back.close();
    }
  });
});

describe('header validation alone', () => {
  /** A version 3 header of a 1 MiB disk with 64 KiB clusters and its L1 table in cluster 3. */
  function v3Header(): Buffer {
    const h = Buffer.alloc(65536);
    h.writeUInt32BE(0x514649fb, 0);
    h.writeUInt32BE(3, 4);
    h.writeUInt32BE(16, 20);
    h.writeBigUInt64BE(1024n * 1024n, 24);
    h.writeUInt32BE(1, 36);
    h.writeBigUInt64BE(3n * 65536n, 40);
    h.writeUInt32BE(4, 96);
    h.writeUInt32BE(112, 100);
    return h;
  }
  const FILE_BYTES = 4 * 65536;
  const refusal = (h: Buffer, status: number, pattern: RegExp) =>
    assert.throws(
      () => parseHeader(h, FILE_BYTES),
      (err: unknown) => err instanceof ApiError && err.status === status && pattern.test(err.message),
    );

  it('accepts a plain version 3 header', () => {
    const header = parseHeader(v3Header(), FILE_BYTES);
    assert.equal(header.virtualSizeBytes, 1024 * 1024);
    assert.equal(header.l1Entries, 1);
    assert.equal(header.extendedL2, false);
  });

  it('names an unknown incompatible feature from the feature name table', () => {
    const h = v3Header();
    h.writeBigUInt64BE(1n << 9n, 72);
    h.writeUInt32BE(0x6803f857, 112); // feature name table, one 48-byte entry
    h.writeUInt32BE(48, 116);
    h[120] = 0; // incompatible
    h[121] = 9;
    h.write('frobnication', 122);
    refusal(h, 422, /unknown incompatible feature bit\(s\) 9 \(frobnication\)/);
  });

  it('refuses zstd compression and cluster sizes qemu refuses, with 422', () => {
    const zstd = v3Header();
    zstd.writeBigUInt64BE(1n << 3n, 72);
    zstd[104] = 1;
    refusal(zstd, 422, /zstd compression/);
    const big = v3Header();
    big.writeUInt32BE(22, 20);
    refusal(big, 422, /cluster size/);
  });

  it('reports inconsistent headers as malformed (400)', () => {
    const shortHeader = v3Header();
    shortHeader.writeUInt32BE(100, 100);
    refusal(shortHeader, 400, /header_length 100/);
    const smallL1 = v3Header();
    smallL1.writeBigUInt64BE(1024n ** 3n, 24);
    refusal(smallL1, 400, /L1 table of 1 entries is too small/);
    const l1OutsideFile = v3Header();
    l1OutsideFile.writeBigUInt64BE(4n * 65536n, 40);
    refusal(l1OutsideFile, 400, /past the end/);
    const unalignedL1 = v3Header();
    unalignedL1.writeBigUInt64BE(65536n + 512n, 40);
    refusal(unalignedL1, 400, /not a non-zero cluster boundary/);
    const extendedSmallClusters = v3Header();
    extendedSmallClusters.writeUInt32BE(12, 20);
    extendedSmallClusters.writeBigUInt64BE(1n << 4n, 72);
    refusal(extendedSmallClusters, 400, /extended L2 entries need clusters of 16 KiB/);
  });
});
