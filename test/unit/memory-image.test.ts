/**
 * The images that live in memory, through the one contract every image
 * keeps (test/contracts/block-image.ts; the file-backed images run it in
 * test/image-contract.test.ts): the sparse memory image, read and written,
 * the empty image of a new VDI, and resized views over them.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { EmptyImage } from '../../src/image/empty-image.js';
import { MemoryImage } from '../../src/image/memory-image.js';
import { ResizedImage } from '../../src/image/resized-image.js';
import { blockImageReadContract, writableImageContract } from '../contracts/block-image.js';
import { prng } from '../helpers/random.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const DISK_BYTES = 3 * MiB + 777;

/** Pieces of data at odd offsets and of odd lengths, holes between them, data in the last bytes. */
function makeDisk(size: number, seed: number): Buffer {
  const rand = prng(seed);
  const disk = Buffer.alloc(size);
  for (let p = 0; p < 10; p++) {
    const length = 1 + Math.floor(rand() * 200 * KiB);
    const start = Math.floor(rand() * (size - length));
    for (let i = start; i < start + length; i++) disk[i] = 1 + Math.floor(rand() * 255);
  }
  for (let i = size - 700; i < size; i++) disk[i] = 1 + (i % 200);
  return disk;
}

/** A memory image holding `disk`, written block by block, all-zero blocks left as holes. */
async function memoryOf(disk: Buffer, blockBytes: number): Promise<MemoryImage> {
  const image = new MemoryImage(disk.length, blockBytes);
  for (let pos = 0; pos < disk.length; pos += blockBytes) {
    const block = disk.subarray(pos, pos + blockBytes);
    if (block.some((b) => b !== 0)) await image.write(pos, block);
  }
  return image;
}

const disk = makeDisk(DISK_BYTES, 1);

for (const blockBytes of [4 * KiB, 64 * KiB]) {
  blockImageReadContract(`memory image (${blockBytes / KiB} KiB blocks)`, async () => ({
    image: await memoryOf(disk, blockBytes),
    expected: disk,
    blockBytes,
  }));
  writableImageContract(`memory image (${blockBytes / KiB} KiB blocks)`, async (size) => ({
    image: new MemoryImage(size, blockBytes),
    blockBytes,
    freesZeroedBlocks: true,
  }));
}

blockImageReadContract('empty image', async () => ({
  image: new EmptyImage(DISK_BYTES),
  expected: Buffer.alloc(DISK_BYTES),
  blockBytes: 64 * KiB,
}));

blockImageReadContract('resized image, larger than a memory image', async () => ({
  image: new ResizedImage(await memoryOf(disk, 64 * KiB), DISK_BYTES + 70_000),
  expected: Buffer.concat([disk, Buffer.alloc(70_000)]),
  blockBytes: 64 * KiB,
}));

blockImageReadContract('resized image, smaller than a memory image', async () => ({
  image: new ResizedImage(await memoryOf(disk, 4 * KiB), 2 * MiB + 5),
  expected: disk.subarray(0, 2 * MiB + 5),
  blockBytes: 4 * KiB,
}));

describe('MemoryImage', () => {
  test('costs what is written, not the virtual size: a 2 TiB disk with three writes', async () => {
    const TiB = 1024 * 1024 * MiB;
    const image = new MemoryImage(2 * TiB);
    await image.write(0, Buffer.alloc(10, 1));
    await image.write(TiB + 100, Buffer.alloc(64 * KiB, 2)); // across two blocks
    await image.write(2 * TiB - 1, Buffer.alloc(1, 3));
    assert.equal(image.allocatedBytes, 4 * 64 * KiB);
    assert.deepEqual(await image.extents(), [
      { start: 0, length: 64 * KiB, zero: false },
      { start: 64 * KiB, length: TiB - 64 * KiB, zero: true },
      { start: TiB, length: 128 * KiB, zero: false },
      { start: TiB + 128 * KiB, length: TiB - 192 * KiB, zero: true },
      { start: 2 * TiB - 64 * KiB, length: 64 * KiB, zero: false },
    ]);
    assert.deepEqual([...(await image.read(TiB + 98, 4))], [0, 0, 2, 2]);
    await image.zero(TiB, 128 * KiB);
    assert.equal(image.allocatedBytes, 2 * 64 * KiB, 'whole blocks zeroed are freed');
    await image.close();
  });

  test('refuses sizes that are no sizes', () => {
    assert.throws(() => new MemoryImage(-1), RangeError);
    assert.throws(() => new MemoryImage(1.5), RangeError);
    assert.throws(() => new MemoryImage(10, 0), RangeError);
  });
});
