/**
 * Hostile VHDs: hundreds of seeded mutations of small valid images (flipped
 * footer, header and BAT bytes, truncations, BAT entries pointing outside the
 * file or at each other, huge sizes), with checksums recomputed in some cases
 * so that validation past the checksums is reached. Every case either opens
 * and reads back consistently, or fails with a 400/413/422 ApiError saying
 * why: never another exception, never a hang, never a huge allocation.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { ApiError } from '../src/errors.js';
import {
  buildDynamicHeader,
  buildFooter,
  DISK_TYPE_DYNAMIC,
  DISK_TYPE_FIXED,
  FOOTER_OFFSETS,
  HEADER_OFFSETS,
  vhdChecksum,
} from '../src/formats/vhd/format.js';
import { vhdCodec } from '../src/formats/vhd/index.js';
import { prngU32 as prng } from './helpers/random.js';

const CASES = 600;
const CASE_TIME_LIMIT_MS = 2000;

function fill(next: () => number, buf: Buffer): Buffer {
  for (let i = 0; i < buf.length; i++) buf[i] = next() & 0xff;
  return buf;
}

interface Base {
  name: string;
  bytes: Buffer;
  /** Offsets of the structures, for targeted mutations (-1 when absent). */
  headerAt: number;
  batAt: number;
  batEntries: number;
}

/**
 * A small dynamic VHD written by hand: tiny blocks, blocks stored out of
 * disk order, one partial and one empty sector bitmap.
 */
function craftDynamic(next: () => number, blockSize: number, entries: number, allocate: number[]): Base {
  const bitmapBytes = Math.ceil(blockSize / 512 / 8 / 512) * 512;
  const stride = bitmapBytes + blockSize;
  const batAt = 1536;
  const dataStart = batAt + Math.ceil((entries * 4) / 512) * 512;
  const size = dataStart + allocate.length * stride + 512;
  const bytes = Buffer.alloc(size, 0xff);
  const footer = buildFooter({
    virtualSizeBytes: entries * blockSize,
    diskType: DISK_TYPE_DYNAMIC,
    dataOffset: 512,
    creatorApp: 'win ',
    creatorOs: 'Wi2k',
    uuid: fill(next, Buffer.alloc(16)),
  });
  footer.copy(bytes, 0);
  footer.copy(bytes, size - 512);
  buildDynamicHeader(batAt, entries, blockSize).copy(bytes, 512);
  allocate.forEach((b, k) => {
    const at = dataStart + k * stride;
    bytes.writeUInt32BE(at / 512, batAt + b * 4);
    bytes.fill(0, at, at + bitmapBytes);
    bytes.fill(k === 1 ? 0x00 : 0xff, at, at + Math.ceil(blockSize / 512 / 8));
    if (k === 2) bytes[at] = 0b10110011;
    fill(next, bytes.subarray(at + bitmapBytes, at + stride));
  });
  return { name: `dynamic ${blockSize}-byte blocks`, bytes, headerAt: 512, batAt, batEntries: entries };
}

function craftFixed(next: () => number, dataBytes: number): Base {
  const bytes = Buffer.alloc(dataBytes + 512);
  fill(next, bytes.subarray(0, dataBytes));
  bytes.fill(0, 4096, 8192);
  buildFooter({
    virtualSizeBytes: dataBytes,
    diskType: DISK_TYPE_FIXED,
    dataOffset: 2 ** 53 - 1,
    creatorApp: 'win ',
    creatorOs: 'Wi2k',
    uuid: fill(next, Buffer.alloc(16)),
  }).copy(bytes, dataBytes);
  return { name: 'fixed', bytes, headerAt: -1, batAt: -1, batEntries: 0 };
}

function fixFooterChecksums(bytes: Buffer): void {
  for (const at of [0, bytes.length - 512]) {
    if (at < 0 || bytes.toString('latin1', at, at + 8) !== 'conectix') continue;
    const footer = bytes.subarray(at, at + 512);
    footer.writeUInt32BE(vhdChecksum(footer, FOOTER_OFFSETS.checksum), FOOTER_OFFSETS.checksum);
  }
}

function fixHeaderChecksum(bytes: Buffer, headerAt: number): void {
  if (headerAt < 0 || headerAt + 1024 > bytes.length) return;
  const header = bytes.subarray(headerAt, headerAt + 1024);
  header.writeUInt32BE(vhdChecksum(header, HEADER_OFFSETS.checksum), HEADER_OFFSETS.checksum);
}

/** Writes a footer field into both footer copies. */
function setFooter(bytes: Buffer, write: (footer: Buffer) => void): void {
  write(bytes.subarray(0, 512));
  write(bytes.subarray(bytes.length - 512));
}

const INTERESTING_U32 = [0, 1, 3, 0x1ff, 0x200, 0x7fffffff, 0x80000000, 0xfffffffe, 0xffffffff];

/** One seeded mutation; returns the mutated copy and a description for failure messages. */
function mutate(base: Base, next: () => number): { bytes: Buffer; what: string } {
  let bytes = Buffer.from(base.bytes);
  const pick = <T>(xs: readonly T[]): T => xs[next() % xs.length];
  const u32 = (): number => (next() % 2 ? pick(INTERESTING_U32) : next());
  const recompute = next() % 3 !== 0;
  const kind = next() % 12;
  let what = '';
  switch (kind) {
    case 0: {
      const at = bytes.length - 512 + (next() % 512);
      bytes[at] ^= 1 << (next() % 8);
      what = `flip trailing footer byte ${at}`;
      break;
    }
    case 1: {
      const at = next() % Math.min(512 + 1024, bytes.length);
      bytes[at] = next() & 0xff;
      what = `set head byte ${at}`;
      break;
    }
    case 2: {
      const v = pick([
        0n,
        1n,
        2n ** 40n,
        2040n * 2n ** 30n,
        2040n * 2n ** 30n + 512n,
        2n ** 63n,
        2n ** 64n - 1n,
      ]);
      const creator = pick(['win ', 'qem2', 'qemu', 'vpc ', 'd2v ', 'tap\0']);
      setFooter(bytes, (f) => {
        f.writeBigUInt64BE(v, FOOTER_OFFSETS.currentSize);
        f.write(creator, FOOTER_OFFSETS.creatorApp, 'latin1');
      });
      what = `current size ${v}, creator ${JSON.stringify(creator)}`;
      break;
    }
    case 3: {
      const c = next() & 0xffff;
      const h = next() & 0xff;
      const s = next() & 0xff;
      setFooter(bytes, (f) => {
        f.writeUInt16BE(c, FOOTER_OFFSETS.cylinders);
        f[FOOTER_OFFSETS.heads] = h;
        f[FOOTER_OFFSETS.sectorsPerTrack] = s;
        f.write(pick(['qemu', 'vpc ', 'win ']), FOOTER_OFFSETS.creatorApp, 'latin1');
      });
      what = `CHS ${c}/${h}/${s}`;
      break;
    }
    case 4: {
      const t = pick([0, 1, 2, 3, 4, 5, 6, next()]);
      setFooter(bytes, (f) => f.writeUInt32BE(t, FOOTER_OFFSETS.diskType));
      what = `disk type ${t}`;
      break;
    }
    case 5: {
      const v = pick([
        0n,
        511n,
        512n,
        513n,
        BigInt(bytes.length - 1024),
        BigInt(bytes.length),
        2n ** 64n - 1n,
      ]);
      setFooter(bytes, (f) => f.writeBigUInt64BE(v, FOOTER_OFFSETS.dataOffset));
      what = `data offset ${v}`;
      break;
    }
    case 6: {
      if (base.headerAt < 0) return mutate(base, next);
      const field = pick(['tableOffset', 'maxTableEntries', 'blockSize'] as const);
      const at = base.headerAt + HEADER_OFFSETS[field];
      if (field === 'tableOffset') {
        const v = pick([
          0n,
          512n,
          1024n,
          BigInt(bytes.length - 4),
          BigInt(bytes.length),
          2n ** 62n,
          BigInt(next()),
        ]);
        bytes.writeBigUInt64BE(v, at);
        what = `table offset ${v}`;
      } else {
        const v = field === 'blockSize' ? pick([256, 512, 1000, 4096, 2 ** 21, 2 ** 31, u32()]) : u32();
        bytes.writeUInt32BE(v >>> 0, at);
        what = `${field} ${v}`;
      }
      if (recompute) fixHeaderChecksum(bytes, base.headerAt);
      return { bytes, what: `${what}${recompute ? ' (checksum fixed)' : ''}` };
    }
    case 7:
    case 8: {
      if (base.batAt < 0) return mutate(base, next);
      const i = next() % base.batEntries;
      const other = bytes.readUInt32BE(base.batAt + (next() % base.batEntries) * 4);
      const v = pick([
        0xffffffff,
        0,
        1,
        3,
        other,
        other + 1,
        Math.floor(bytes.length / 512),
        Math.floor(bytes.length / 512) - 1,
        u32(),
      ]);
      bytes.writeUInt32BE(v >>> 0, base.batAt + i * 4);
      what = `BAT[${i}] = ${v}`;
      break;
    }
    case 9: {
      const length = next() % bytes.length;
      bytes = bytes.subarray(0, length);
      what = `truncate to ${length}`;
      break;
    }
    case 10: {
      const flips = 1 + (next() % 8);
      for (let k = 0; k < flips; k++) bytes[next() % bytes.length] ^= 1 << (next() % 8);
      what = `${flips} random bit flips`;
      break;
    }
    default: {
      const extra = Buffer.alloc(1 + (next() % 2048));
      fill(next, extra);
      bytes = Buffer.concat([bytes, extra]);
      what = `append ${extra.length} bytes of garbage`;
    }
  }
  if (recompute) {
    fixFooterChecksums(bytes);
    fixHeaderChecksum(bytes, base.headerAt);
    what += ' (checksums fixed)';
  }
  return { bytes, what };
}

/** Opens and reads an image the way an import would; throws only what open/read throw. */
async function exercise(path: string, fileSize: number): Promise<void> {
  const image = await vhdCodec.open(path);
  try {
    assert.ok(Number.isSafeInteger(image.virtualSize) && image.virtualSize >= 0);
    assert.ok(image.virtualSize <= 2040 * 2 ** 30);
    const extents = await image.extents();
    let pos = 0;
    let dataBytes = 0;
    for (const e of extents) {
      assert.equal(e.start, pos);
      assert.ok(e.length > 0);
      pos += e.length;
      if (!e.zero) dataBytes += e.length;
    }
    assert.equal(pos, image.virtualSize, 'extents cover the disk exactly once');
    // Data comes from the file: never more of it than the file holds.
    assert.ok(dataBytes <= fileSize, `${dataBytes} bytes of data in a ${fileSize}-byte file`);
    for (const e of extents) {
      const n = e.zero ? Math.min(e.length, 65536) : e.length;
      const got = await image.read(e.start, n);
      assert.equal(got.length, n);
      if (e.zero)
        assert.ok(
          got.every((b) => b === 0),
          `zero extent at ${e.start} reads zeros`,
        );
    }
    if (image.virtualSize <= 4 * 2 ** 20) {
      // Reads of any alignment agree with one whole read.
      const whole = await image.read(0, image.virtualSize);
      for (let at = 0; at < image.virtualSize; at += 1531) {
        const piece = await image.read(at, 777);
        assert.ok(piece.equals(whole.subarray(at, at + 777)), `read at ${at} agrees with the whole`);
      }
    }
  } finally {
    await image.close();
  }
}

describe('malformed VHDs', () => {
  let dir: string;
  const bases: Base[] = [];
  before(async () => {
    dir = await fsp.mkdtemp(join(tmpdir(), 'vhd-fuzz-'));
    const next = prng(42);
    bases.push(craftDynamic(next, 4096, 16, [3, 0, 7, 15, 8, 1]));
    bases.push(craftDynamic(next, 512, 24, [5, 4, 23, 0, 9]));
    bases.push(craftFixed(next, 64 * 1024));
    // And one written by qemu-img, 2 MiB blocks.
    const raw = join(dir, 'base.raw');
    const data = Buffer.alloc(2 * 2 ** 20);
    fill(next, data.subarray(0, 300 * 1024));
    await fsp.writeFile(raw, data);
    const vhd = join(dir, 'base.vhd');
    execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'vpc', raw, vhd], { stdio: 'ignore' });
    const bytes = await fsp.readFile(vhd);
    bases.push({
      name: 'qemu-img dynamic',
      bytes,
      headerAt: 512,
      batAt: Number(bytes.readBigUInt64BE(512 + HEADER_OFFSETS.tableOffset)),
      batEntries: bytes.readUInt32BE(512 + HEADER_OFFSETS.maxTableEntries),
    });
  });
  after(async () => {
    await fsp.rm(dir, { recursive: true, force: true });
  });

  it('opens every unmutated base image', async () => {
    for (const base of bases) {
      const path = join(dir, 'base-check.vhd');
      await fsp.writeFile(path, base.bytes);
      await exercise(path, base.bytes.length);
    }
  });

  it(`survives ${CASES} seeded mutations: reads consistently or refuses with 400/413/422`, {
    timeout: 60_000,
  }, async () => {
    const next = prng(20240601);
    const outcomes = { opened: 0, refused: 0 };
    const path = join(dir, 'case.vhd');
    for (let c = 0; c < CASES; c++) {
      const base = bases[c % bases.length];
      const { bytes, what } = mutate(base, next);
      await fsp.writeFile(path, bytes);
      const started = Date.now();
      try {
        await exercise(path, bytes.length);
        outcomes.opened++;
      } catch (err) {
        if (!(err instanceof ApiError)) {
          assert.fail(
            `case ${c} (${base.name}: ${what}) threw a non-API error: ${(err as Error)?.stack ?? err}`,
          );
        }
        assert.ok([400, 413, 422].includes(err.status), `case ${c} (${what}): status ${err.status}`);
        assert.ok(err.message.length > 20, 'the message says what was wrong');
        outcomes.refused++;
        if (process.env.VHD_FUZZ_LOG) console.log(`${c} ${what} -> ${err.status} ${err.message}`);
      }
      const elapsed = Date.now() - started;
      assert.ok(elapsed < CASE_TIME_LIMIT_MS, `case ${c} (${base.name}: ${what}) took ${elapsed} ms`);
    }
    // Both paths must really be exercised, or the mutations are too weak or too strong.
    assert.ok(outcomes.opened > CASES / 10, `opened ${outcomes.opened}`);
    assert.ok(outcomes.refused > CASES / 10, `refused ${outcomes.refused}`);
  });
});
