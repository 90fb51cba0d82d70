/**
 * Block digests hashed from bytes as they are written (a streaming import's
 * data) must be the very entries the commit would write by reading the disk
 * back: fed in pieces of every size, across block boundaries, with gaps,
 * zero runs, rewrites of part of a block, and ranges changed behind the
 * feed's back.
 */
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { MemoryImage } from '../../src/image/memory-image.js';
import { writeBlockDigests } from '../../src/storage/block-digests.js';
import { StreamedDigests } from '../../src/storage/streamed-digests.js';
import { prng, seededBytes } from '../helpers/random.js';
import { tempDir } from '../helpers/server.js';

const BLOCK = 64 * 1024;

/** The digest file of `disk` written with `known` and without it: they must be the same bytes. */
async function digestFiles(dir: string, disk: Buffer, known: StreamedDigests): Promise<[Buffer, Buffer]> {
  const image = new MemoryImage(disk.length);
  await image.write(0, disk);
  const [withKnown, read] = [path.join(dir, 'known'), path.join(dir, 'read')];
  await writeBlockDigests(image, withKnown, undefined, known);
  await writeBlockDigests(image, read);
  return [await fsp.readFile(withKnown), await fsp.readFile(read)];
}

async function knownBlocks(known: StreamedDigests, size: number): Promise<number> {
  await known.settle();
  let n = 0;
  const out = Buffer.alloc(16);
  for (let b = 0; b < Math.ceil(size / BLOCK); b++) if (known.entryInto(b, out, 0)) n++;
  return n;
}

describe('digests of streamed blocks', () => {
  let dir: string;
  before(async () => {
    dir = await tempDir();
  });
  after(async () => {
    await fsp.rm(dir, { recursive: true, force: true });
  });

  test('blocks fed whole in one piece or several are known, and their entries are those read back', async () => {
    const size = 8 * BLOCK - 512;
    const disk = seededBytes(size, 1);
    disk.fill(0, 2 * BLOCK, 3 * BLOCK); // a block of zeros: a zero entry, no hash
    const known = new StreamedDigests(size);
    // Pieces of 1000 bytes: every block starts and ends inside one; the short last block too.
    for (let at = 0; at < size; at += 1000) known.feed(disk.subarray(at, at + 1000), at);
    assert.equal(await knownBlocks(known, size), 8);
    const [a, b] = await digestFiles(dir, disk, known);
    assert.ok(a.equals(b));
  });

  test('a gap in the feed, or a piece starting inside a block, leaves those blocks to be read', async () => {
    const size = 8 * BLOCK;
    const disk = seededBytes(size, 2);
    const known = new StreamedDigests(size);
    known.feed(disk.subarray(0, BLOCK + 100), 0);
    // Bytes [BLOCK + 100, BLOCK + 200) are written by someone else: block 1 is not the feed's.
    known.feed(disk.subarray(BLOCK + 200, 4 * BLOCK), BLOCK + 200);
    known.feed(disk.subarray(5 * BLOCK + 1, 8 * BLOCK), 5 * BLOCK + 1);
    const out = Buffer.alloc(16);
    await known.settle();
    const knownOnes = [0, 1, 2, 3, 4, 5, 6, 7].filter((b) => known.entryInto(b, out, 0));
    assert.deepEqual(knownOnes, [0, 2, 3, 6, 7]);
    const [a, b] = await digestFiles(dir, disk, known);
    assert.ok(a.equals(b));
  });

  test('a block rewritten in part, or changed behind the feed (forget), is no longer known', async () => {
    const size = 6 * BLOCK;
    const disk = seededBytes(size, 3);
    const known = new StreamedDigests(size);
    known.feed(disk, 0);
    assert.equal(await knownBlocks(known, size), 6);
    seededBytes(10, 4).copy(disk, BLOCK + 5);
    known.feed(disk.subarray(BLOCK + 5, BLOCK + 15), BLOCK + 5);
    disk.fill(0, 3 * BLOCK + 7, 5 * BLOCK - 3);
    known.forget(3 * BLOCK + 7, 5 * BLOCK - 3);
    const out = Buffer.alloc(16);
    await known.settle();
    assert.deepEqual(
      [0, 1, 2, 3, 4, 5].filter((b) => known.entryInto(b, out, 0)),
      [0, 2, 5],
    );
    const [a, b] = await digestFiles(dir, disk, known);
    assert.ok(a.equals(b));
  });

  test('blocks fed again or forgotten while their first bytes are still being hashed keep only the latest', async () => {
    const size = 64 * BLOCK;
    const disk = seededBytes(size, 5);
    const known = new StreamedDigests(size);
    known.feed(Buffer.from(disk), 0); // 4 batches, hashing on the thread pool
    // At once, before any of them is hashed: new bytes for blocks 3-9, others changed behind the feed.
    const again = seededBytes(7 * BLOCK, 6);
    again.copy(disk, 3 * BLOCK);
    known.feed(again, 3 * BLOCK);
    disk.fill(7, 40 * BLOCK + 1, 41 * BLOCK);
    known.forget(40 * BLOCK + 1, 41 * BLOCK);
    assert.equal(await knownBlocks(known, size), 63);
    const [a, b] = await digestFiles(dir, disk, known);
    assert.ok(a.equals(b));
  });

  for (let seed = 1; seed <= 20; seed++) {
    test(`random feeds ${seed}: the entries equal those read back`, async () => {
      const rnd = prng(seed * 104729);
      const size = (4 + Math.floor(rnd() * 40)) * BLOCK - (rnd() < 0.4 ? 512 * Math.floor(rnd() * 100) : 0);
      const disk = Buffer.alloc(size);
      const known = new StreamedDigests(size);
      let pos = 0;
      for (let step = 0; step < 60; step++) {
        const r = rnd();
        if (r < 0.1) pos = Math.floor(rnd() * size); // a jump: the stream goes on elsewhere
        if (r > 0.95) {
          // Bytes changed behind the feed's back.
          const at = Math.floor(rnd() * size);
          const len = Math.min(size - at, Math.floor(rnd() * 3 * BLOCK));
          seededBytes(len, seed * 1000 + step).copy(disk, at);
          known.forget(at, at + len);
          continue;
        }
        const len = Math.min(size - pos, 1 + Math.floor(rnd() * 2.5 * BLOCK));
        const piece = rnd() < 0.25 ? Buffer.alloc(len) : seededBytes(len, seed * 1000 + step);
        piece.copy(disk, pos);
        known.feed(piece, pos);
        pos = (pos + len) % size;
      }
      const [a, b] = await digestFiles(dir, disk, known);
      assert.ok(a.equals(b), 'the digest files are the same bytes');
    });
  }
});
