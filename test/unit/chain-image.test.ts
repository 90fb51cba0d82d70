/**
 * ChainImage against a brute-force model: seeded chains of memory layers,
 * each defining ranges of odd offsets and lengths (some holding zeros over
 * their parent's data), read as the model says the top-most defining layer
 * reads. It also keeps the read contract every image keeps.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { ChainImage, type ChainLayer, type DefinedRange } from '../../src/image/chain-image.js';
import { MemoryImage } from '../../src/image/memory-image.js';
import { isZero } from '../../src/image/zero.js';
import { assertExtentsCover, blockImageReadContract } from '../contracts/block-image.js';
import { prng, seededBytes } from '../helpers/random.js';

const KiB = 1024;
const MiB = 1024 * KiB;

interface Built {
  image: ChainImage;
  expected: Buffer;
}

/**
 * A chain of `depth` layers over a disk of `size`: the base holds scattered
 * data; every layer above defines a few ranges, writing data into most and
 * leaving some as zeros (zeros over the parent). `baseSize` smaller than
 * `size` is a disk grown after its base was written.
 */
async function buildChain(seed: number, size: number, depth: number, baseSize = size): Promise<Built> {
  const rand = prng(seed);
  const expected = Buffer.alloc(size);
  const layers: ChainLayer[] = [];
  const base = new MemoryImage(baseSize);
  for (let i = 0; i < 6; i++) {
    const start = Math.floor(rand() * baseSize);
    const data = seededBytes(Math.min(baseSize - start, 1 + Math.floor(rand() * 300 * KiB)), seed + i);
    await base.write(start, data);
    data.copy(expected, start);
  }
  layers.unshift({ image: base, defined: [{ start: 0, length: baseSize }] });
  for (let level = 1; level < depth; level++) {
    const image = new MemoryImage(size);
    const defined: DefinedRange[] = [];
    let pos = Math.floor(rand() * 200 * KiB);
    while (pos < size) {
      const length = Math.min(size - pos, 1 + Math.floor(rand() * 200 * KiB));
      defined.push({ start: pos, length });
      if (rand() < 0.75) {
        const data = seededBytes(length, seed * 31 + level * 1000 + pos);
        await image.write(pos, data);
        data.copy(expected, pos);
      } else {
        expected.fill(0, pos, pos + length);
      }
      pos += length + 1 + Math.floor(rand() * 600 * KiB);
    }
    layers.unshift({ image, defined });
  }
  return { image: new ChainImage(size, layers), expected };
}

blockImageReadContract('chain of 5 memory layers', async () => {
  const { image, expected } = await buildChain(7, 3 * MiB + 777, 5);
  return { image, expected, blockBytes: 64 * KiB };
});

blockImageReadContract('chain over a base smaller than the disk (grown)', async () => {
  const { image, expected } = await buildChain(8, 3 * MiB, 3, 2 * MiB + 512);
  return { image, expected, blockBytes: 64 * KiB };
});

describe('chain image', () => {
  test('50 seeded chains up to 16 deep read and map as the model says', async () => {
    for (let seed = 1; seed <= 50; seed++) {
      const size = 512 * KiB + Math.floor(prng(seed)() * 3 * MiB);
      const depth = 1 + (seed % 16);
      const { image, expected } = await buildChain(seed, size, depth, seed % 5 === 0 ? size >> 1 : size);
      assert.equal(image.depth, depth);
      assert.ok((await image.read(0, size)).equals(expected), `seed ${seed}: whole disk`);
      const rand = prng(seed * 7);
      for (let i = 0; i < 20; i++) {
        const offset = Math.floor(rand() * size);
        const length = 1 + Math.floor(rand() * 256 * KiB);
        assert.ok(
          (await image.read(offset, length)).equals(expected.subarray(offset, offset + length)),
          `seed ${seed}: read(${offset}, ${length})`,
        );
      }
      const extents = await image.extents();
      assertExtentsCover(extents, size);
      for (const e of extents) {
        if (e.zero) assert.ok(isZero(expected, e.start, e.start + e.length), `seed ${seed}: zero extent`);
      }
      await image.close();
    }
  });

  test('a range defined as zeros hides the data below it; an undefined range shows it', async () => {
    const base = new MemoryImage(4 * MiB);
    await base.write(0, Buffer.alloc(4 * MiB, 0xaa));
    const top = new MemoryImage(4 * MiB);
    await top.write(3 * MiB, Buffer.alloc(MiB, 0xbb));
    const chain = new ChainImage(4 * MiB, [
      {
        image: top,
        defined: [
          { start: MiB, length: MiB },
          { start: 3 * MiB, length: MiB },
        ],
      },
      { image: base, defined: [{ start: 0, length: 4 * MiB }] },
    ]);
    const all = await chain.read(0, 4 * MiB);
    assert.ok(all.subarray(0, MiB).equals(Buffer.alloc(MiB, 0xaa)), 'undefined: the parent');
    assert.ok(all.subarray(MiB, 2 * MiB).equals(Buffer.alloc(MiB)), 'defined, a hole: zeros');
    assert.ok(all.subarray(2 * MiB, 3 * MiB).equals(Buffer.alloc(MiB, 0xaa)));
    assert.ok(all.subarray(3 * MiB).equals(Buffer.alloc(MiB, 0xbb)), 'defined, data: the layer');
    assert.deepEqual(await chain.extents(), [
      { start: 0, length: MiB, zero: false },
      { start: MiB, length: MiB, zero: true },
      { start: 2 * MiB, length: 2 * MiB, zero: false },
    ]);
    await chain.close();
    await assert.rejects(base.read(0, 1), 'closing the chain closes its layers');
  });

  test('no layer at all reads as an empty disk', async () => {
    const chain = new ChainImage(MiB, []);
    assert.ok((await chain.read(0, MiB)).equals(Buffer.alloc(MiB)));
    assert.deepEqual(await chain.extents(), [{ start: 0, length: MiB, zero: true }]);
  });
});
