/** How an export answers Range, If-Range and If-None-Match (RFC 9110), decided before a byte is read. */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import type { Request } from 'express';
import { ApiError } from '../../src/errors.js';
import { planResponse, type Representation } from '../../src/http/ranges.js';

const SIZE = 1000;
const ETAG = '"gen-7"';
const BOUNDARY = 'b0undary';

const rep: Representation = {
  size: SIZE,
  etag: ETAG,
  lastModified: new Date('2026-01-02T03:04:05Z'),
  contentType: 'application/octet-stream',
  filename: 'disk.raw',
  read: async function* () {},
};

/** The request headers planResponse reads, nothing else. */
function request(headers: Record<string, string>): Request {
  const lower = Object.fromEntries(Object.entries(headers).map(([k, v]) => [k.toLowerCase(), v]));
  return { headers: lower, get: (name: string) => lower[name.toLowerCase()] } as unknown as Request;
}

const partHeader = (start: number, end: number) =>
  `\r\n--${BOUNDARY}\r\nContent-Type: ${rep.contentType}\r\nContent-Range: bytes ${start}-${end}/${SIZE}\r\n\r\n`;
const trailer = `\r\n--${BOUNDARY}--\r\n`;

describe('planResponse', () => {
  const cases: {
    name: string;
    headers: Record<string, string>;
    status: number;
    ranges: [number, number][];
    multipart?: boolean;
  }[] = [
    { name: 'no Range: the whole representation', headers: {}, status: 200, ranges: [[0, 999]] },
    { name: 'one range', headers: { range: 'bytes=100-199' }, status: 206, ranges: [[100, 199]] },
    { name: 'open-ended', headers: { range: 'bytes=900-' }, status: 206, ranges: [[900, 999]] },
    { name: 'suffix', headers: { range: 'bytes=-10' }, status: 206, ranges: [[990, 999]] },
    {
      name: 'a suffix longer than the whole',
      headers: { range: 'bytes=-5000' },
      status: 206,
      ranges: [[0, 999]],
    },
    {
      name: 'an end past the size is cut',
      headers: { range: 'bytes=990-5000' },
      status: 206,
      ranges: [[990, 999]],
    },
    {
      name: 'two ranges: multipart',
      headers: { range: 'bytes=0-9,500-509' },
      status: 206,
      ranges: [
        [0, 9],
        [500, 509],
      ],
      multipart: true,
    },
    {
      name: 'overlapping ranges are combined into one',
      headers: { range: 'bytes=0-99,50-149' },
      status: 206,
      ranges: [[0, 149]],
    },
    {
      name: 'a long suffix beside another range: one range, all of it',
      headers: { range: 'bytes=0-0,-5000' },
      status: 206,
      ranges: [[0, 999]],
    },
    {
      name: 'a malformed Range is ignored',
      headers: { range: 'bytes=abc' },
      status: 200,
      ranges: [[0, 999]],
    },
    {
      name: 'a unit other than bytes is ignored',
      headers: { range: 'pages=1-2' },
      status: 200,
      ranges: [[0, 999]],
    },
    {
      name: 'If-Range naming the current ETag: the range',
      headers: { range: 'bytes=10-19', 'if-range': ETAG },
      status: 206,
      ranges: [[10, 19]],
    },
    {
      name: 'If-Range naming another ETag: the whole, fresh',
      headers: { range: 'bytes=10-19', 'if-range': '"gen-6"' },
      status: 200,
      ranges: [[0, 999]],
    },
    {
      name: 'If-Range with the weak form of the ETag: the whole (a range needs a strong match)',
      headers: { range: 'bytes=10-19', 'if-range': `W/${ETAG}` },
      status: 200,
      ranges: [[0, 999]],
    },
    {
      name: 'If-Range with a date is never trusted: the whole',
      headers: { range: 'bytes=10-19', 'if-range': rep.lastModified.toUTCString() },
      status: 200,
      ranges: [[0, 999]],
    },
    { name: 'If-None-Match with the ETag: 304', headers: { 'if-none-match': ETAG }, status: 304, ranges: [] },
    {
      name: 'If-None-Match compares weakly',
      headers: { 'if-none-match': `"other", W/${ETAG}` },
      status: 304,
      ranges: [],
    },
    { name: 'If-None-Match: * matches', headers: { 'if-none-match': '*' }, status: 304, ranges: [] },
    {
      name: 'If-None-Match with another ETag: the range asked for',
      headers: { 'if-none-match': '"gen-6"', range: 'bytes=0-0' },
      status: 206,
      ranges: [[0, 0]],
    },
  ];
  for (const c of cases) {
    test(c.name, () => {
      const plan = planResponse(request(c.headers), rep, BOUNDARY);
      assert.equal(plan.status, c.status);
      assert.deepEqual(
        plan.ranges.map((r) => [r.start, r.end]),
        c.ranges,
      );
      assert.equal(plan.multipart, c.multipart ?? false);
      const body = c.ranges.reduce((n, [s, e]) => n + e - s + 1, 0);
      const framing = plan.multipart
        ? c.ranges.reduce((n, [s, e]) => n + partHeader(s, e).length, trailer.length)
        : 0;
      assert.equal(plan.bodyLength, body + framing, 'Content-Length is exact before the body is made');
    });
  }

  const refusals: { name: string; range: string; message: RegExp }[] = [
    { name: 'a range that starts past the end', range: 'bytes=1000-1001', message: /outside the 1000-byte/ },
    { name: 'an empty suffix', range: 'bytes=-0', message: /outside/ },
    {
      name: 'more than 256 ranges',
      range: `bytes=${Array.from({ length: 300 }, (_, i) => `${i * 3}-${i * 3}`).join(',')}`,
      message: /too many ranges \(300\)/,
    },
  ];
  for (const r of refusals) {
    test(`${r.name}: 416 with Content-Range bytes */size`, () => {
      assert.throws(
        () => planResponse(request({ range: r.range }), rep, BOUNDARY),
        (err: unknown) => {
          assert.ok(err instanceof ApiError);
          assert.equal(err.status, 416);
          assert.equal(err.code, 'RANGE_NOT_SATISFIABLE');
          assert.match(err.message, r.message);
          assert.deepEqual(err.headers, { 'Content-Range': `bytes */${SIZE}` });
          return true;
        },
      );
    });
  }

  test('an empty representation is a 200 with no range, whatever is asked', () => {
    const empty = { ...rep, size: 0 };
    const plan = planResponse(request({}), empty, BOUNDARY);
    assert.deepEqual(plan, { status: 200, ranges: [], multipart: false, bodyLength: 0 });
    assert.throws(() => planResponse(request({ range: 'bytes=0-0' }), empty, BOUNDARY), /outside/);
  });
});
