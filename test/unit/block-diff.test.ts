/**
 * diffBlocks against the bytes: for seeded pairs of disks (the next content
 * rewriting some blocks identically, changing some, zeroing some, writing
 * zeros where the parent had none, growing past the parent's end), a layer
 * holding exactly the runs it gives, read over the parent through a
 * ChainImage, is the next disk; and every block it leaves out reads the
 * same in both, every block it gives differs. digestDiffRuns, told by the
 * two disks' block digest files, gives the same blocks, reading only the
 * next disk's changed ones.
 */
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { DIFF_BLOCK_BYTES, type DiffRun, diffBlocks } from '../../src/image/block-diff.js';
import { ChainImage } from '../../src/image/chain-image.js';
import { MemoryImage } from '../../src/image/memory-image.js';
import { digestDiffRuns, writeBlockDigests } from '../../src/storage/block-digests.js';
import { prng, seededBytes } from '../helpers/random.js';
import { tempDir } from '../helpers/server.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const BLOCK = DIFF_BLOCK_BYTES;

async function imageOf(bytes: Buffer, writes: [number, number][]): Promise<MemoryImage> {
  const image = new MemoryImage(bytes.length);
  for (const [start, length] of writes) await image.write(start, bytes.subarray(start, start + length));
  return image;
}

async function collect(next: MemoryImage, parent: MemoryImage): Promise<DiffRun[]> {
  return collectRuns(diffBlocks(next, parent));
}

async function collectRuns(gen: AsyncIterable<DiffRun>): Promise<DiffRun[]> {
  const runs: DiffRun[] = [];
  for await (const r of gen) runs.push({ ...r, data: r.data ? Buffer.from(r.data) : undefined });
  return runs;
}

/** Each block's fate in `runs`: absent, 'zero' or 'data'. */
function blockFates(runs: DiffRun[], size: number): string[] {
  const fates: string[] = Array(Math.ceil(size / BLOCK)).fill('absent');
  for (const r of runs) {
    for (let b = r.start; b < r.start + r.length; b += BLOCK) fates[b / BLOCK] = r.zero ? 'zero' : 'data';
  }
  return fates;
}

/** `image`, counting the bytes read from it. */
function counting(image: MemoryImage, count: { bytes: number }): MemoryImage {
  return Object.assign(Object.create(image), {
    readInto: async (buf: Buffer, offset: number) => {
      const got = await image.readInto(buf, offset);
      count.bytes += got.length;
      return got;
    },
  }) as MemoryImage;
}

describe('block diff', () => {
  let dir: string;
  before(async () => {
    dir = await tempDir();
  });
  after(() => fsp.rm(dir, { recursive: true, force: true }));

  test('40 seeded pairs: the layer of the diff over the parent reads as the next disk, and holds only changed blocks', async () => {
    for (let seed = 1; seed <= 40; seed++) {
      const rand = prng(seed);
      const parentSize = 2 * MiB + Math.floor(rand() * 2 * MiB);
      const size = seed % 4 === 0 ? parentSize + 512 * KiB + 512 : parentSize;
      const parentBytes = Buffer.alloc(parentSize);
      const parentWrites: [number, number][] = [];
      for (let i = 0; i < 5; i++) {
        const start = Math.floor(rand() * parentSize);
        const length = Math.min(parentSize - start, 1 + Math.floor(rand() * 400 * KiB));
        seededBytes(length, seed * 100 + i).copy(parentBytes, start);
        parentWrites.push([start, length]);
      }
      const nextBytes = Buffer.alloc(size);
      parentBytes.copy(nextBytes);
      // The next disk is a whole image: every byte written, as an import lands it.
      const nextWrites: [number, number][] = [[0, size]];
      for (let i = 0; i < 6; i++) {
        const start = Math.floor(rand() * size);
        const length = Math.min(size - start, 1 + Math.floor(rand() * 200 * KiB));
        const kind = rand();
        if (kind < 0.4) seededBytes(length, seed * 1000 + i).copy(nextBytes, start);
        else if (kind < 0.7) nextBytes.fill(0, start, start + length);
        // else: rewritten with the same bytes
      }
      const parent = await imageOf(parentBytes, parentWrites);
      const next = await imageOf(nextBytes, nextWrites);
      const runs = await collect(next, parent);

      let pos = 0;
      const layer = new MemoryImage(size);
      for (const r of runs) {
        assert.ok(
          r.start >= pos && r.start % BLOCK === 0,
          `seed ${seed}: runs are ordered and block-aligned`,
        );
        assert.ok(r.length > 0);
        assert.equal(r.zero, r.data === undefined);
        if (r.data) {
          assert.equal(r.data.length, r.length);
          await layer.write(r.start, r.data);
        }
        pos = r.start + r.length;
      }
      const chain = new ChainImage(size, [
        { image: layer, defined: runs.map(({ start, length }) => ({ start, length })) },
        { image: parent, defined: [{ start: 0, length: parentSize }] },
      ]);
      assert.ok(
        (await chain.read(0, size)).equals(nextBytes),
        `seed ${seed}: the chain reads as the next disk`,
      );

      // Minimal: a block is in the diff exactly when it reads otherwise in the parent.
      const inDiff = (b: number) => runs.some((r) => r.start <= b && b < r.start + r.length);
      const padded = Buffer.alloc(size);
      parentBytes.copy(padded);
      for (let b = 0; b < size; b += BLOCK) {
        const end = Math.min(size, b + BLOCK);
        const same = nextBytes.subarray(b, end).equals(padded.subarray(b, end));
        assert.equal(inDiff(b), !same, `seed ${seed}: block at ${b}`);
      }

      // By digests: the same blocks, the same bytes, read from the next disk only where they differ.
      const nextDigests = path.join(dir, `next-${seed}.digests`);
      const parentDigests = path.join(dir, `parent-${seed}.digests`);
      await writeBlockDigests(next, nextDigests);
      await writeBlockDigests(parent, parentDigests);
      const read = { bytes: 0 };
      const byDigests = await digestDiffRuns(counting(next, read), nextDigests, parentDigests);
      if (size !== parentSize) {
        assert.equal(byDigests, null, `seed ${seed}: disks of two sizes are diffed by their bytes`);
        continue;
      }
      assert.ok(byDigests, `seed ${seed}: digests of both`);
      const digestRuns = await collectRuns(byDigests);
      assert.deepEqual(blockFates(digestRuns, size), blockFates(runs, size), `seed ${seed}: the same blocks`);
      for (const r of digestRuns) {
        if (r.data) assert.ok(r.data.equals(nextBytes.subarray(r.start, r.start + r.length)));
      }
      const dataBytes = digestRuns.reduce((n, r) => n + (r.data ? r.length : 0), 0);
      assert.equal(read.bytes, dataBytes, `seed ${seed}: only the changed data blocks are read`);
    }
  });

  test('digestDiffRuns: a missing digest file is null (the caller reads the bytes)', async () => {
    const image = new MemoryImage(MiB);
    const file = path.join(dir, 'one.digests');
    await writeBlockDigests(image, file);
    assert.equal(await digestDiffRuns(image, file, path.join(dir, 'missing.digests')), null);
  });

  test('rewriting every byte identically gives no run; zeros over data give zero runs that store nothing', async () => {
    const bytes = seededBytes(MiB, 5);
    const parent = await imageOf(bytes, [[0, MiB]]);
    assert.deepEqual(await collect(await imageOf(Buffer.from(bytes), [[0, MiB]]), parent), []);

    const zeroed = Buffer.from(bytes);
    zeroed.fill(0, 2 * BLOCK, 5 * BLOCK);
    assert.deepEqual(await collect(await imageOf(zeroed, [[0, MiB]]), parent), [
      { start: 2 * BLOCK, length: 3 * BLOCK, zero: true, data: undefined },
    ]);
  });

  test('two empty disks of 1 TiB are compared without reading a byte', async () => {
    const TiB = 1024 ** 4;
    const read = { bytes: 0 };
    const runs: DiffRun[] = [];
    for await (const r of diffBlocks(
      counting(new MemoryImage(TiB), read),
      counting(new MemoryImage(TiB), read),
    ))
      runs.push(r);
    assert.deepEqual(runs, []);
    assert.equal(read.bytes, 0);
  });
});
