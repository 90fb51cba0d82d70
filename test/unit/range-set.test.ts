/** RangeSet: what a resumable upload has received, kept merged whatever order the chunks come in. */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { type ByteRange, RangeSet } from '../../src/transfer/range-set.js';
import { prng } from '../helpers/random.js';

describe('RangeSet.add keeps the ranges merged and ordered', () => {
  const cases: { name: string; adds: ByteRange[]; ranges: ByteRange[]; offset: number; size: number }[] = [
    { name: 'nothing', adds: [], ranges: [], offset: 0, size: 0 },
    { name: 'an empty range is ignored', adds: [[5, 5]], ranges: [], offset: 0, size: 0 },
    { name: 'a backwards range is ignored', adds: [[9, 3]], ranges: [], offset: 0, size: 0 },
    { name: 'one range from 0', adds: [[0, 10]], ranges: [[0, 10]], offset: 10, size: 10 },
    { name: 'one range past 0', adds: [[4, 10]], ranges: [[4, 10]], offset: 0, size: 6 },
    {
      name: 'touching ranges join',
      adds: [
        [0, 4],
        [4, 8],
      ],
      ranges: [[0, 8]],
      offset: 8,
      size: 8,
    },
    {
      name: 'touching ranges join in reverse order',
      adds: [
        [4, 8],
        [0, 4],
      ],
      ranges: [[0, 8]],
      offset: 8,
      size: 8,
    },
    {
      name: 'a gap stays a gap',
      adds: [
        [0, 4],
        [6, 8],
      ],
      ranges: [
        [0, 4],
        [6, 8],
      ],
      offset: 4,
      size: 6,
    },
    {
      name: 'a resend inside a range changes nothing',
      adds: [
        [0, 10],
        [2, 5],
      ],
      ranges: [[0, 10]],
      offset: 10,
      size: 10,
    },
    {
      name: 'a range spanning several swallows them',
      adds: [
        [2, 3],
        [5, 6],
        [8, 9],
        [1, 10],
      ],
      ranges: [[1, 10]],
      offset: 0,
      size: 9,
    },
    {
      name: 'a range filling the gap between two joins all three',
      adds: [
        [0, 4],
        [8, 12],
        [4, 8],
      ],
      ranges: [[0, 12]],
      offset: 12,
      size: 12,
    },
    {
      name: 'an overlap on the left extends a range',
      adds: [
        [5, 10],
        [3, 7],
      ],
      ranges: [[3, 10]],
      offset: 0,
      size: 7,
    },
    {
      name: 'a range before all others goes first',
      adds: [
        [10, 20],
        [30, 40],
        [0, 5],
      ],
      ranges: [
        [0, 5],
        [10, 20],
        [30, 40],
      ],
      offset: 5,
      size: 25,
    },
    {
      name: 'a range between two others goes between them',
      adds: [
        [0, 5],
        [30, 40],
        [10, 20],
      ],
      ranges: [
        [0, 5],
        [10, 20],
        [30, 40],
      ],
      offset: 5,
      size: 25,
    },
  ];
  for (const c of cases) {
    test(c.name, () => {
      const set = new RangeSet();
      for (const [s, e] of c.adds) set.add(s, e);
      assert.deepEqual(set.toJSON(), c.ranges);
      assert.equal(set.contiguousFromZero(), c.offset, 'contiguousFromZero');
      assert.equal(set.size(), c.size, 'size');
      // What was saved and loaded again is the same set.
      assert.deepEqual(new RangeSet(set.toJSON()).toJSON(), c.ranges);
    });
  }
});

describe('RangeSet.missing and covers', () => {
  const set = new RangeSet([
    [10, 20],
    [30, 40],
  ]);
  const cases: { ask: ByteRange; missing: ByteRange[] }[] = [
    { ask: [0, 10], missing: [[0, 10]] },
    { ask: [0, 15], missing: [[0, 10]] },
    { ask: [10, 20], missing: [] },
    { ask: [12, 18], missing: [] },
    { ask: [15, 35], missing: [[20, 30]] },
    {
      ask: [0, 50],
      missing: [
        [0, 10],
        [20, 30],
        [40, 50],
      ],
    },
    { ask: [20, 30], missing: [[20, 30]] },
    { ask: [40, 45], missing: [[40, 45]] },
    { ask: [5, 5], missing: [] },
  ];
  for (const c of cases) {
    test(`[${c.ask}) misses ${JSON.stringify(c.missing)}`, () => {
      assert.deepEqual(set.missing(c.ask[0], c.ask[1]), c.missing);
      assert.equal(set.covers(c.ask[0], c.ask[1]), c.missing.length === 0);
    });
  }
});

test('random chunks in random order agree with a byte map of what was sent', () => {
  const SIZE = 4096;
  for (let seed = 1; seed <= 50; seed++) {
    const rnd = prng(seed);
    const set = new RangeSet();
    const have = new Uint8Array(SIZE);
    for (let i = 0; i < 40; i++) {
      const start = Math.floor(rnd() * SIZE);
      const end = Math.min(SIZE, start + Math.floor(rnd() * 300));
      set.add(start, end);
      have.fill(1, start, end);
    }
    const expected: ByteRange[] = [];
    for (let i = 0; i < SIZE; i++) {
      if (!have[i]) continue;
      const last = expected.at(-1);
      if (last && last[1] === i) last[1] = i + 1;
      else expected.push([i, i + 1]);
    }
    assert.deepEqual(set.toJSON(), expected, `seed ${seed}`);
    assert.equal(
      set.size(),
      have.reduce((n, b) => n + b, 0),
      `seed ${seed}`,
    );
    const from = Math.floor(rnd() * SIZE);
    const to = from + Math.floor(rnd() * (SIZE - from));
    const gaps = set.missing(from, to);
    for (let i = from; i < to; i++) {
      const inGap = gaps.some(([s, e]) => i >= s && i < e);
      assert.equal(inGap, !have[i], `seed ${seed}: byte ${i}`);
    }
  }
});
