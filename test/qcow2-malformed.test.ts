/**
 * A hostile qcow2 image must never crash, hang or exhaust the service: we
 * take small valid images written by qemu-img and damage them in seeded ways
 * (header fields, truncation, L1/L2 entries pointing outside the file, at the
 * header, at the tables themselves or at each other, bogus compressed
 * descriptors, garbage in compressed data). Each case either opens and reads
 * consistently, or fails with an ApiError of status 400, 413 or 422.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { ApiError } from '../src/errors.js';
import { qcow2Codec } from '../src/formats/qcow2/index.js';
import type { BlockImage } from '../src/image/block-image.js';
import { isZero } from '../src/image/zero.js';
import { prng } from './helpers/random.js';

const QEMU_IMG = '/usr/bin/qemu-img';
const CASES_PER_BASE = 200;
/** Bytes read from each image that opens: enough to touch every cluster of these small images. */
const READ_BUDGET_BYTES = 4 * 1024 * 1024;
/** A single case taking this long is a hang. */
const CASE_TIMEOUT_MS = 5000;
const ALLOWED_STATUSES = new Set([400, 413, 422]);

function makeRaw(path: string, size: number, seed: number): void {
  const rand = prng(seed);
  const fd = openSync(path, 'w');
  for (let p = 0; p < 8; p++) {
    const length = 512 * (1 + Math.floor(rand() * 200));
    const start = 512 * Math.floor((rand() * (size - length)) / 512);
    const buf = Buffer.alloc(length);
    // Low-entropy bytes, so that compressed images really hold compressed clusters.
    for (let i = 0; i < length; i++) buf[i] = Math.floor(rand() * 4) + (p % 2 ? 0 : 97);
    writeSync(fd, buf, 0, length, start);
  }
  closeSync(fd);
  execFileSync('truncate', ['-s', String(size), path]);
}

/** Where the mapping lives in a valid image, so mutations can aim at it. */
interface Anatomy {
  clusterSize: number;
  l1Offset: number;
  l1Entries: number;
  l2Offsets: number[];
  l2EntryBytes: number;
  /** File positions of L2 entries that are not zero. */
  usedL2Entries: number[];
  /** Host offsets of data clusters (standard descriptors). */
  dataOffsets: number[];
  compressedEntries: number[];
}

const OFFSET_MASK = 0x00fffffffffffe00n;

function anatomy(img: Buffer): Anatomy {
  const clusterSize = 2 ** img.readUInt32BE(20);
  const version = img.readUInt32BE(4);
  const extended = version === 3 && (img.readBigUInt64BE(72) & 16n) !== 0n;
  const l2EntryBytes = extended ? 16 : 8;
  const l1Offset = Number(img.readBigUInt64BE(40));
  const l1Entries = img.readUInt32BE(36);
  const l2Offsets: number[] = [];
  const usedL2Entries: number[] = [];
  const dataOffsets: number[] = [];
  const compressedEntries: number[] = [];
  for (let i = 0; i < l1Entries; i++) {
    const l2 = Number(img.readBigUInt64BE(l1Offset + i * 8) & OFFSET_MASK);
    if (l2 === 0) continue;
    l2Offsets.push(l2);
    for (let j = 0; j < clusterSize / l2EntryBytes; j++) {
      const pos = l2 + j * l2EntryBytes;
      const entry = img.readBigUInt64BE(pos);
      if (entry === 0n) continue;
      usedL2Entries.push(pos);
      if (entry & (1n << 62n)) compressedEntries.push(pos);
      else if (entry & OFFSET_MASK) dataOffsets.push(Number(entry & OFFSET_MASK));
    }
  }
  return {
    clusterSize,
    l1Offset,
    l1Entries,
    l2Offsets,
    l2EntryBytes,
    usedL2Entries,
    dataOffsets,
    compressedEntries,
  };
}

interface Base {
  name: string;
  bytes: Buffer;
  anatomy: Anatomy;
}

type Mutation = (img: Buffer, a: Anatomy, rand: () => number) => Buffer;

const pick = <T>(rand: () => number, items: readonly T[]): T => items[Math.floor(rand() * items.length)];

function interesting64(rand: () => number, img: Buffer, a: Anatomy): bigint {
  const size = BigInt(img.length);
  const candidates: bigint[] = [
    0n,
    1n,
    512n,
    BigInt(a.clusterSize),
    size,
    size - 1n,
    size + BigInt(a.clusterSize),
    (size / BigInt(a.clusterSize)) * BigInt(a.clusterSize),
    BigInt(a.l1Offset),
    BigInt(pick(rand, a.l2Offsets.length ? a.l2Offsets : [0])),
    0xffffffffn,
    1n << 40n,
    1n << 46n,
    (1n << 46n) + 1n,
    1n << 55n,
    (1n << 63n) - 1n,
    0xffffffffffffffffn,
    BigInt(Math.floor(rand() * 2 ** 32)) * BigInt(Math.floor(rand() * 2 ** 32)),
  ];
  return pick(rand, candidates);
}

const HEADER_U32_FIELDS = [4, 16, 20, 32, 36, 56, 60, 96, 100];
const HEADER_U64_FIELDS = [8, 24, 40, 48, 64, 72, 80, 88];

const mutations: { name: string; apply: Mutation }[] = [
  {
    name: 'flip header bits',
    apply: (img, _a, rand) => {
      for (let n = 1 + Math.floor(rand() * 3); n > 0; n--) {
        const pos = Math.floor(rand() * 112);
        img[pos] ^= 1 << Math.floor(rand() * 8);
      }
      return img;
    },
  },
  {
    name: 'header u32 field',
    apply: (img, a, rand) => {
      const v = pick(rand, [0, 1, 2, 3, 4, 7, 8, 9, 16, 21, 22, 63, 64, 72, 104, 105, 112, 4096, 0xffffffff]);
      img.writeUInt32BE(
        rand() < 0.5 ? v : Number(interesting64(rand, img, a) & 0xffffffffn),
        pick(rand, HEADER_U32_FIELDS),
      );
      return img;
    },
  },
  {
    name: 'header u64 field',
    apply: (img, a, rand) => {
      img.writeBigUInt64BE(interesting64(rand, img, a), pick(rand, HEADER_U64_FIELDS));
      return img;
    },
  },
  {
    name: 'header extension garbage',
    apply: (img, _a, rand) => {
      const start = img.readUInt32BE(4) === 3 ? img.readUInt32BE(100) : 72;
      img.writeUInt32BE(pick(rand, [0x6803f857, 0xe2792aca, 0x44415441, 0x0537be77, 0x12345678]), start);
      img.writeUInt32BE(pick(rand, [0, 1, 48, 49, 4096, 65536, 0xffffffff]), start + 4);
      return img;
    },
  },
  {
    name: 'truncate',
    apply: (img, a, rand) => {
      const candidates = [
        0,
        3,
        71,
        104,
        a.l1Offset + 4,
        ...a.l2Offsets.map((o) => o + 8),
        Math.floor(rand() * img.length),
      ];
      return img.subarray(0, Math.min(img.length, pick(rand, candidates)));
    },
  },
  {
    name: 'L1 entry',
    apply: (img, a, rand) => {
      const i = Math.floor(rand() * Math.max(1, a.l1Entries));
      const size = BigInt(img.length);
      const c = BigInt(a.clusterSize);
      const v = pick(rand, [
        interesting64(rand, img, a),
        BigInt(a.l1Offset) | (1n << 63n),
        0n | (1n << 63n),
        (((size + c - 1n) / c) * c) | (1n << 63n),
        BigInt(pick(rand, a.l2Offsets.length ? a.l2Offsets : [a.clusterSize])) | (1n << 63n),
        BigInt(pick(rand, a.dataOffsets.length ? a.dataOffsets : [a.clusterSize])) | (1n << 63n),
        BigInt(a.clusterSize + 512),
      ]);
      img.writeBigUInt64BE(v, a.l1Offset + i * 8);
      return img;
    },
  },
  {
    name: 'duplicate L1 entries',
    apply: (img, a, rand) => {
      if (a.l1Entries < 2) return img;
      const from = a.l1Offset + Math.floor(rand() * a.l1Entries) * 8;
      const to = a.l1Offset + Math.floor(rand() * a.l1Entries) * 8;
      img.copy(img, to, from, from + 8);
      return img;
    },
  },
  {
    name: 'L2 entry',
    apply: (img, a, rand) => {
      if (a.usedL2Entries.length === 0) return img;
      const pos = pick(rand, a.usedL2Entries);
      const size = BigInt(img.length);
      const c = BigInt(a.clusterSize);
      const copied = 1n << 63n;
      const v = pick(rand, [
        interesting64(rand, img, a),
        copied | (((size + c) / c) * c),
        copied | (c + 512n),
        copied | BigInt(a.l1Offset),
        copied | BigInt(pick(rand, a.l2Offsets)),
        copied,
        1n,
        copied | 1n | BigInt(pick(rand, a.dataOffsets.length ? a.dataOffsets : [0])),
        BigInt(pick(rand, a.dataOffsets.length ? a.dataOffsets : [0])) |
          (BigInt(Math.floor(rand() * 256)) << 1n),
      ]);
      img.writeBigUInt64BE(v, pos);
      if (a.l2EntryBytes === 16 && rand() < 0.5) {
        img.writeBigUInt64BE(
          pick(rand, [0n, 1n, 0xffffffffn, 0x1_0000_0001n, 0xffffffff_00000000n]),
          pos + 8,
        );
      }
      return img;
    },
  },
  {
    name: 'compressed descriptor',
    apply: (img, a, rand) => {
      const targets = a.compressedEntries.length ? a.compressedEntries : a.usedL2Entries;
      if (targets.length === 0) return img;
      const pos = pick(rand, targets);
      const clusterBits = BigInt(Math.log2(a.clusterSize));
      const shift = 62n - (clusterBits - 8n);
      const sectors = BigInt(Math.floor(rand() * Number(1n << (clusterBits - 8n))));
      const offset = pick(rand, [
        0n,
        100n,
        BigInt(a.l1Offset),
        BigInt(img.length - 1),
        BigInt(img.length),
        BigInt(img.length) + 4096n,
        BigInt(Math.floor(rand() * img.length)),
        (1n << shift) - 1n,
      ]);
      img.writeBigUInt64BE((1n << 62n) | (sectors << shift) | (offset & ((1n << shift) - 1n)), pos);
      return img;
    },
  },
  {
    name: 'garbage in data',
    apply: (img, a, rand) => {
      const at =
        a.compressedEntries.length && rand() < 0.7
          ? Number(
              img.readBigUInt64BE(pick(rand, a.compressedEntries)) &
                ((1n << (62n - BigInt(Math.log2(a.clusterSize) - 8))) - 1n),
            )
          : Math.floor(rand() * img.length);
      for (let n = 0; n < 1 + Math.floor(rand() * 64); n++) {
        const p = at + Math.floor(rand() * 512);
        if (p < img.length) img[p] = Math.floor(rand() * 256);
      }
      return img;
    },
  },
  {
    name: 'random bytes anywhere',
    apply: (img, _a, rand) => {
      for (let n = 0; n < 1 + Math.floor(rand() * 16); n++)
        img[Math.floor(rand() * img.length)] = Math.floor(rand() * 256);
      return img;
    },
  },
];

function assertApiError(err: unknown, label: string): number {
  if (!(err instanceof ApiError)) {
    assert.fail(
      `${label}: threw ${err instanceof Error ? `${err.name}: ${err.message}\n${err.stack}` : String(err)}`,
    );
  }
  assert.ok(ALLOWED_STATUSES.has(err.status), `${label}: status ${err.status} (${err.message})`);
  if (process.env.QCOW2_FUZZ_VERBOSE) console.log(err.status, err.message.replace(/\d+/g, 'N'));
  return err.status;
}

/** Reads what an opened image says it holds and checks it is self-consistent. */
async function exercise(image: BlockImage, rand: () => number): Promise<void> {
  const size = image.virtualSize;
  const extents = await image.extents();
  let pos = 0;
  for (const e of extents) {
    assert.equal(e.start, pos, 'extents are contiguous');
    assert.ok(e.length > 0, 'extents are not empty');
    pos += e.length;
  }
  assert.equal(pos, size, 'extents cover the disk');
  let budget = READ_BUDGET_BYTES;
  for (const e of extents) {
    if (budget <= 0) break;
    const length = Math.min(e.length, budget, 1024 * 1024);
    const got = await image.read(e.start, length);
    assert.equal(got.length, length);
    if (e.zero) assert.ok(isZero(got), `zero extent at ${e.start} reads as zeros`);
    budget -= length;
  }
  for (let n = 0; n < 4 && size > 0; n++) {
    const start = Math.floor(rand() * size);
    const length = Math.floor(rand() * 200_000);
    const a = await image.read(start, length);
    const b = await image.read(start, length);
    assert.equal(a.length, Math.min(length, size - start));
    assert.ok(a.equals(b), 'the same range reads the same twice');
  }
}

function withTimeout<T>(p: Promise<T>, label: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`${label}: no answer after ${CASE_TIMEOUT_MS} ms (hang)`)),
      CASE_TIMEOUT_MS,
    );
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}

let dir: string;
const bases: Base[] = [];

before(() => {
  dir = mkdtempSync(join(tmpdir(), 'qcow2-fuzz-'));
  const raw = join(dir, 'base.raw');
  makeRaw(raw, 3 * 1024 * 1024 + 1536, 11);
  const variants: [string, string[]][] = [
    ['v3 64 KiB', ['-o', 'compat=1.1']],
    ['v2', ['-o', 'compat=0.10']],
    ['compressed 4 KiB clusters', ['-c', '-o', 'cluster_size=4096']],
    ['512-byte clusters', ['-o', 'cluster_size=512']],
    ['extended L2', ['-o', 'extended_l2=on,cluster_size=16384']],
  ];
  for (const [name, opts] of variants) {
    const out = join(dir, `${bases.length}.qcow2`);
    execFileSync(QEMU_IMG, ['convert', '-f', 'raw', '-O', 'qcow2', ...opts, raw, out]);
    const bytes = readFileSync(out);
    bases.push({ name, bytes, anatomy: anatomy(bytes) });
  }
  const zero = join(dir, 'zero.qcow2');
  execFileSync(QEMU_IMG, ['create', '-f', 'qcow2', zero, '2M']);
  const ok = spawnSync('qemu-io', [
    '-f',
    'qcow2',
    '-c',
    'write -P 0x11 0 1M',
    '-c',
    'write -z 256k 128k',
    zero,
  ]);
  if (ok.status === 0) {
    const bytes = readFileSync(zero);
    bases.push({ name: 'zero clusters', bytes, anatomy: anatomy(bytes) });
  }
});

after(() => {
  rmSync(dir, { recursive: true, force: true });
});

describe('damaged qcow2 images', () => {
  it('the undamaged bases open and read', async () => {
    for (const base of bases) {
      const path = join(dir, 'case.qcow2');
      writeFileSync(path, base.bytes);
      const image = await qcow2Codec.open(path);
      try {
        await exercise(image, prng(1));
      } finally {
        await image.close();
      }
    }
  });

  it(`each of ${CASES_PER_BASE} seeded damages per base opens consistently or fails with 400/413/422`, {
    timeout: 55_000,
  }, async (t) => {
    const outcomes = new Map<string, number>();
    const count = (key: string) => outcomes.set(key, (outcomes.get(key) ?? 0) + 1);
    const path = join(dir, 'case.qcow2');
    let cases = 0;
    for (const [b, base] of bases.entries()) {
      for (let c = 0; c < CASES_PER_BASE; c++) {
        const seed = b * 100_000 + c;
        const rand = prng(seed);
        // Every mutation kind is tried on every base; some cases stack two or three.
        const kinds = [mutations[c % mutations.length]];
        if (c >= mutations.length * 5) {
          for (let n = Math.floor(rand() * 3); n > 0; n--) kinds.push(pick(rand, mutations));
        }
        let img: Buffer = Buffer.from(base.bytes);
        for (const m of kinds) {
          try {
            img = m.apply(img, base.anatomy, rand);
          } catch (err) {
            // A stacked mutation aimed past an earlier truncation: nothing to damage.
            if (!(err instanceof RangeError)) throw err;
          }
        }
        writeFileSync(path, img);
        const label = `${base.name}, case ${c} (seed ${seed}: ${kinds.map((k) => k.name).join(' + ')})`;
        cases++;
        let image: BlockImage;
        try {
          image = await withTimeout(qcow2Codec.open(path), label);
        } catch (err) {
          count(`refused ${assertApiError(err, label)}`);
          continue;
        }
        try {
          await withTimeout(exercise(image, rand), label);
          count('opened and read');
        } catch (err) {
          if (err instanceof assert.AssertionError)
            throw new assert.AssertionError({ message: `${label}: ${err.message}` });
          count(`read failed ${assertApiError(err, label)}`);
        } finally {
          await image.close();
        }
      }
    }
    t.diagnostic(`${cases} cases: ${JSON.stringify(Object.fromEntries(outcomes))}`);
    assert.ok(cases >= 500, `${cases} cases`);
    assert.ok(
      (outcomes.get('opened and read') ?? 0) > 50,
      'many damaged images still open (the fuzz reaches reads)',
    );
    assert.ok((outcomes.get('refused 400') ?? 0) > 50, 'many are refused as malformed');
  });
});
