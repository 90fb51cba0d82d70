/** Extents and zero runs: what makes every transfer cost the allocated data, not the virtual size. */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { allocatedBytes, type Extent, mergeExtents } from '../../src/image/block-image.js';
import { findExtent } from '../../src/image/read-virtual.js';
import { forEachRun, isZero, ZERO_BLOCK_BYTES } from '../../src/image/zero.js';
import { prng } from '../helpers/random.js';

const data = (start: number, length: number): Extent => ({ start, length, zero: false });
const hole = (start: number, length: number): Extent => ({ start, length, zero: true });

describe('mergeExtents', () => {
  const cases: { name: string; input: Extent[]; merged: Extent[] }[] = [
    { name: 'nothing', input: [], merged: [] },
    { name: 'one extent', input: [data(0, 10)], merged: [data(0, 10)] },
    { name: 'adjacent data joins', input: [data(0, 10), data(10, 5)], merged: [data(0, 15)] },
    { name: 'adjacent holes join', input: [hole(0, 10), hole(10, 5), hole(15, 1)], merged: [hole(0, 16)] },
    {
      name: 'data and holes alternate',
      input: [data(0, 4), hole(4, 4), data(8, 4)],
      merged: [data(0, 4), hole(4, 4), data(8, 4)],
    },
    { name: 'empty extents are dropped', input: [data(0, 4), hole(4, 0), data(4, 4)], merged: [data(0, 8)] },
    {
      name: 'negative lengths are dropped',
      input: [data(0, 4), data(4, -2), hole(4, 4)],
      merged: [data(0, 4), hole(4, 4)],
    },
    {
      name: 'a gap between two of a kind keeps them apart',
      input: [data(0, 4), data(6, 4)],
      merged: [data(0, 4), data(6, 4)],
    },
  ];
  for (const c of cases) {
    test(c.name, () => {
      const input = c.input.map((e) => ({ ...e }));
      assert.deepEqual(mergeExtents(input), c.merged);
      assert.deepEqual(input, c.input, 'the input is left as it was');
      assert.equal(
        allocatedBytes(mergeExtents(c.input)),
        c.input.reduce((n, e) => n + (e.zero || e.length < 0 ? 0 : e.length), 0),
      );
    });
  }
  test('takes any iterable (a generator of extents from a format table)', () => {
    function* table() {
      for (let i = 0; i < 8; i++) yield i < 4 ? data(i * 2, 2) : hole(i * 2, 2);
    }
    assert.deepEqual(mergeExtents(table()), [data(0, 8), hole(8, 8)]);
  });
});

describe('findExtent', () => {
  const extents = [data(0, 10), hole(10, 20), data(30, 1), hole(31, 69)];
  const cases: [offset: number, index: number][] = [
    [0, 0],
    [9, 0],
    [10, 1],
    [29, 1],
    [30, 2],
    [31, 3],
    [99, 3],
  ];
  for (const [offset, index] of cases) {
    test(`offset ${offset} is in extent ${index}`, () => assert.equal(findExtent(extents, offset), index));
  }
  test('agrees with a linear search on random extent lists', () => {
    const rnd = prng(3);
    for (let round = 0; round < 50; round++) {
      const list: Extent[] = [];
      let at = 0;
      for (let i = 0; i < 1 + Math.floor(rnd() * 30); i++) {
        const length = 1 + Math.floor(rnd() * 100);
        list.push({ start: at, length, zero: i % 2 === 1 });
        at += length;
      }
      for (let k = 0; k < 20; k++) {
        const offset = Math.floor(rnd() * at);
        const linear = list.findIndex((e) => offset >= e.start && offset < e.start + e.length);
        assert.equal(findExtent(list, offset), linear, `offset ${offset} in ${JSON.stringify(list)}`);
      }
    }
  });
});

describe('zero runs', () => {
  const B = ZERO_BLOCK_BYTES;
  /** A buffer of `blocks` file-system blocks; the listed ones carry a non-zero byte at `at` in the block. */
  const blocks = (count: number, nonZero: number[], at = 0) => {
    const buf = Buffer.alloc(count * B);
    for (const i of nonZero) buf[i * B + at] = 1;
    return buf;
  };
  const runs = (buf: Buffer, length = buf.length, base = 0) => {
    const out: [number, number, boolean][] = [];
    forEachRun(buf, length, base, (s, e, zero) => out.push([s, e, zero]));
    return out;
  };

  const cases: {
    name: string;
    buf: Buffer;
    base?: number;
    length?: number;
    runs: [number, number, boolean][];
  }[] = [
    { name: 'all zeros is one zero run', buf: blocks(4, []), runs: [[0, 4 * B, true]] },
    { name: 'all data is one data run', buf: blocks(3, [0, 1, 2]), runs: [[0, 3 * B, false]] },
    {
      name: 'data, hole, data',
      buf: blocks(4, [0, 3], B - 1),
      runs: [
        [0, B, false],
        [B, 3 * B, true],
        [3 * B, 4 * B, false],
      ],
    },
    {
      name: 'a non-zero last byte makes its whole block data',
      buf: blocks(2, [1], B - 1),
      runs: [
        [0, B, true],
        [B, 2 * B, false],
      ],
    },
    {
      name: 'blocks align on the disk, not on the buffer',
      buf: blocks(2, [1]),
      base: B / 2,
      // buf[B] is disk byte 1.5 B: in the disk's block [B, 2B), which starts at buf[B/2].
      runs: [
        [0, B / 2, true],
        [B / 2, 3 * (B / 2), false],
        [3 * (B / 2), 2 * B, true],
      ],
    },
    { name: 'only the first `length` bytes count', buf: blocks(2, [1]), length: B, runs: [[0, B, true]] },
    { name: 'an empty buffer has no run', buf: Buffer.alloc(0), runs: [] },
  ];
  for (const c of cases) {
    test(c.name, () => {
      assert.deepEqual(runs(c.buf, c.length, c.base), c.runs);
    });
  }

  test('isZero looks at every byte, not just the ends', () => {
    const buf = Buffer.alloc(10 * 1024 * 1024);
    assert.ok(isZero(buf));
    buf[7 * 1024 * 1024 + 3] = 9;
    assert.ok(!isZero(buf));
    assert.ok(isZero(buf, 0, 7 * 1024 * 1024));
    assert.ok(isZero(buf, 7 * 1024 * 1024 + 4));
    assert.ok(isZero(buf, 5, 5), 'an empty range is zero');
  });
});
