/**
 * Stream layouts: what a vhd or qcow2 upload arriving in order lets diskport
 * put straight into the disk. Every announced piece must hold exactly the
 * guest bytes it claims, and an image diskport itself exported streams whole.
 * Images are built in memory with diskport's own serializers.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { qcow2Codec } from '../../src/formats/qcow2/index.js';
import type { DataPiece, StreamLayout } from '../../src/formats/stream-layout.js';
import type { FormatCodec } from '../../src/formats/types.js';
import { vhdCodec } from '../../src/formats/vhd/index.js';
import { MemoryImage } from '../../src/image/memory-image.js';
import { prng, seededBytes } from '../helpers/random.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** A disk of `size` bytes holding `pieces` of seeded data: [offset, length]. */
async function disk(
  size: number,
  pieces: [number, number][],
): Promise<{ image: MemoryImage; bytes: Buffer }> {
  const image = new MemoryImage(size);
  const bytes = Buffer.alloc(size);
  for (const [i, [offset, length]] of pieces.entries()) {
    const data = seededBytes(length, 100 + i);
    await image.write(offset, data);
    data.copy(bytes, offset);
  }
  return { image, bytes };
}

async function exported(codec: FormatCodec, image: MemoryImage): Promise<Buffer> {
  const serialized = await codec.serialize(image);
  const chunks: Buffer[] = [];
  for await (const c of serialized.read(0, serialized.size)) chunks.push(Buffer.from(c));
  const stream = Buffer.concat(chunks);
  assert.equal(stream.length, serialized.size);
  return stream;
}

/**
 * Plays `stream` into `layout` as an upload would deliver it, `chunk` bytes at
 * a time: each metadata range it needs is learned once it has all arrived,
 * and the pieces inside each delivered range are taken.
 */
function replay(layout: StreamLayout, stream: Buffer, chunk: number): DataPiece[] {
  const pieces: DataPiece[] = [];
  for (let start = 0; start < stream.length; start += chunk) {
    const end = Math.min(stream.length, start + chunk);
    for (let need = layout.need(); need && need[1] <= end; need = layout.need()) {
      layout.learn(stream.subarray(need[0], need[1]));
    }
    pieces.push(...layout.take(start, end));
  }
  return pieces;
}

/** Checks every piece against the disk; returns the disk rebuilt from the pieces alone. */
function placed(pieces: DataPiece[], stream: Buffer, bytes: Buffer): Buffer {
  const rebuilt = Buffer.alloc(bytes.length);
  for (const p of pieces) {
    const host = stream.subarray(p.host, p.host + p.length);
    assert.ok(host.equals(bytes.subarray(p.guest, p.guest + p.length)), `piece ${JSON.stringify(p)}`);
    host.copy(rebuilt, p.guest);
  }
  return rebuilt;
}

const ODD = 40 * MiB + 7 * 512;
const disks: { name: string; size: number; pieces: [number, number][] }[] = [
  { name: 'an empty disk', size: 8 * MiB, pieces: [] },
  { name: 'one piece at 0', size: 8 * MiB, pieces: [[0, 3 * MiB]] },
  {
    name: 'pieces across block and cluster boundaries, an odd size',
    size: ODD,
    pieces: [
      [MiB + 4096, 5 * MiB],
      [2 * MiB - 512, 1024],
      [20 * MiB + 3 * KiB, 64 * KiB + 1],
      [ODD - 7 * 512, 7 * 512],
    ],
  },
  {
    name: 'many small pieces',
    size: 16 * MiB,
    pieces: Array.from(
      { length: 40 },
      (_, i) => [i * 400 * KiB + (i % 7) * 512, 4 * KiB + i * 512] as [number, number],
    ),
  },
];

for (const codec of [vhdCodec, qcow2Codec]) {
  describe(`${codec.name} stream layout`, () => {
    for (const d of disks) {
      for (const chunk of [512, 64 * KiB, MiB, Number.MAX_SAFE_INTEGER]) {
        const how = chunk === Number.MAX_SAFE_INTEGER ? 'in one piece' : `${chunk} bytes at a time`;
        test(`${d.name}, delivered ${how}: every byte of data streams into place`, async () => {
          const { image, bytes } = await disk(d.size, d.pieces);
          const stream = await exported(codec, image);
          const layout = codec.streamLayout!(stream.length);
          const pieces = replay(layout, stream, chunk);
          assert.ok(placed(pieces, stream, bytes).equals(bytes), 'the pieces alone rebuild the disk');
          assert.equal(layout.need(), null, 'nothing more to read');
          layout.verifyEnd(stream.subarray(stream.length - 512), pieces.length > 0);
        });
      }
    }

    test('an upload of unknown length still announces only true pieces', async () => {
      const { image, bytes } = await disk(ODD, disks[2].pieces);
      const stream = await exported(codec, image);
      const pieces = replay(codec.streamLayout!(null), stream, 64 * KiB);
      placed(pieces, stream, bytes);
    });

    test('bytes that are no image never make a layout throw; what it announces lies inside the upload', async () => {
      // (Whether such an upload is a disk at all is open()'s to say at finalize.)
      const rnd = prng(9);
      const head = await exported(codec, (await disk(8 * MiB, [[0, MiB]])).image);
      for (let round = 0; round < 20; round++) {
        const stream = seededBytes(MiB + Math.floor(rnd() * MiB), 500 + round);
        // Half of them start like the format, so the layout reads further before it gives up.
        if (round % 2) head.copy(stream, 0, 0, 4096);
        const layout = codec.streamLayout!(stream.length);
        for (const p of replay(layout, stream, 64 * KiB)) {
          assert.ok(p.host >= 0 && p.length > 0 && p.host + p.length <= stream.length, JSON.stringify(p));
          assert.ok(p.guest >= 0, JSON.stringify(p));
        }
      }
    });

    test('a layout stays bounded whatever the image claims: needs are at most 16 MiB', async () => {
      const { image } = await disk(64 * MiB, [[0, MiB]]);
      const stream = await exported(codec, image);
      const layout = codec.streamLayout!(stream.length);
      for (let need = layout.need(); need; need = layout.need()) {
        assert.ok(need[1] - need[0] <= 16 * MiB && need[0] >= 0, JSON.stringify(need));
        layout.learn(stream.subarray(need[0], need[1]));
      }
    });
  });
}
