/**
 * The hot reads (GET/HEAD of /v1/vdis/{vdi}/contents) skip express
 * (src/routes/lean.ts). Each answer here is compared with express's answer
 * to the same request: the VDI id with one letter percent-encoded is the
 * same id to express, and the lean path leaves such a request to express.
 */
import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import { after, before, describe, test } from 'node:test';
import { seededBytes, startServer, type TestServer } from './helpers/server.js';

const SIZE = 1024 * 1024;
const TOKEN = 'lean-secret';

interface Answer {
  status: number;
  headers: Record<string, string>;
  body: string;
}

const BOUNDARY = /diskport-[0-9a-f]{24}/g;

/** Status, headers (but the date and the request id) and body; a multipart boundary is random each time. */
async function answer(url: string, init: RequestInit): Promise<Answer> {
  const res = await fetch(url, init);
  const headers: Record<string, string> = {};
  for (const [k, v] of res.headers) {
    if (k !== 'date' && k !== 'x-request-id') headers[k] = v.replace(BOUNDARY, 'diskport-B');
  }
  const body = Buffer.from(await res.arrayBuffer())
    .toString('latin1')
    .replace(BOUNDARY, 'diskport-B');
  return { status: res.status, headers, body };
}

/** The id with its first letter percent-encoded: the same VDI to express, not taken by the lean path. */
function encoded(id: string): string {
  const i = id.search(/[a-f]/);
  return `${id.slice(0, i)}%${id.charCodeAt(i).toString(16)}${id.slice(i + 1)}`;
}

describe('lean reads answer as express does', () => {
  let srv: TestServer;
  let id: string;
  const auth = { Authorization: `Bearer ${TOKEN}` };
  const lines: string[] = [];
  before(async () => {
    const log = new Writable({
      write(chunk, _enc, done) {
        lines.push(...String(chunk).trim().split('\n'));
        done();
      },
    });
    srv = await startServer({ token: TOKEN, log, logLevel: 'debug' });
    const created = await fetch(`${srv.url}/v1/vdis`, {
      method: 'POST',
      headers: { ...auth, 'Content-Type': 'application/json' },
      body: JSON.stringify({ name_label: 'lean', virtual_size: SIZE }),
    });
    assert.equal(created.status, 201);
    id = ((await created.json()) as { id: string }).id;
    const put = await fetch(`${srv.url}/v1/vdis/${id}/contents?format=raw`, {
      method: 'PUT',
      headers: auth,
      body: new Uint8Array(seededBytes(SIZE, 3)),
    });
    assert.equal(put.status, 200);
  });
  after(() => srv.close());

  const cases: [string, string, RequestInit][] = [
    ['a ranged GET', '?format=raw', { headers: { ...auth, Range: 'bytes=65536-131071' } }],
    ['a ranged GET of the vhd export', '?format=vhd', { headers: { ...auth, Range: 'bytes=0-4095' } }],
    ['a ranged GET of the qcow2 export', '?format=qcow2', { headers: { ...auth, Range: 'bytes=-512' } }],
    ['a GET with no query', '', { headers: { ...auth, Range: 'bytes=10-19' } }],
    ['a HEAD', '?format=raw', { method: 'HEAD', headers: auth }],
    ['a range past the end (416)', '?format=raw', { headers: { ...auth, Range: `bytes=${SIZE}-` } }],
    ['two ranges', '?format=raw', { headers: { ...auth, Range: 'bytes=0-9,100-109' } }],
    ['an unknown format', '?format=vmdk', { headers: { ...auth, Range: 'bytes=0-9' } }],
    ['no token', '?format=raw', { headers: { Range: 'bytes=0-9' } }],
    ['a wrong token', '?format=raw', { headers: { Authorization: 'Bearer nope', Range: 'bytes=0-9' } }],
    ['a HEAD without a token', '?format=raw', { method: 'HEAD' }],
  ];
  for (const [what, query, init] of cases) {
    test(what, async () => {
      const lean = await answer(`${srv.url}/v1/vdis/${id}/contents${query}`, init);
      const viaExpress = await answer(`${srv.url}/v1/vdis/${encoded(id)}/contents${query}`, init);
      assert.deepEqual(lean, viaExpress);
    });
  }

  test('extents, once computed, answer as express does; a write changes them', async () => {
    const extentsOf = (vdi: string, query = '', headers: Record<string, string> = auth) =>
      answer(`${srv.url}/v1/vdis/${vdi}/extents${query}`, { headers });
    await extentsOf(id); // computes them
    for (const query of ['', '?context=zero']) {
      const lean = await extentsOf(id, query);
      assert.equal(lean.status, 200);
      assert.deepEqual(lean, await extentsOf(encoded(id), query));
    }
    const refused = await extentsOf(id, '', {});
    assert.equal(refused.status, 401);
    assert.deepEqual(refused, await extentsOf(encoded(id), '', {}));
    // Half zeros: the extents change with the write.
    const half = seededBytes(SIZE, 5);
    half.fill(0, SIZE / 2);
    const put = await fetch(`${srv.url}/v1/vdis/${id}/contents?format=raw`, {
      method: 'PUT',
      headers: auth,
      body: new Uint8Array(half),
    });
    assert.equal(put.status, 200);
    for (let i = 0; i < 2; i++) {
      const after = await extentsOf(id);
      assert.deepEqual(JSON.parse(after.body), [
        { start: 0, length: SIZE / 2, zero: false },
        { start: SIZE / 2, length: SIZE / 2, zero: true },
      ]);
      assert.deepEqual(after, await extentsOf(encoded(id)));
    }
    const restored = await fetch(`${srv.url}/v1/vdis/${id}/contents?format=raw`, {
      method: 'PUT',
      headers: auth,
      body: new Uint8Array(seededBytes(SIZE, 3)),
    });
    assert.equal(restored.status, 200);
  });

  test('an unknown VDI', async () => {
    const missing = '00000000-0000-4000-8000-00000000abcd';
    const init = { headers: { ...auth, Range: 'bytes=0-9' } };
    const lean = await answer(`${srv.url}/v1/vdis/${missing}/contents?format=raw`, init);
    const viaExpress = await answer(`${srv.url}/v1/vdis/${encoded(missing)}/contents?format=raw`, init);
    assert.equal(lean.status, 404);
    assert.deepEqual(lean, viaExpress);
  });

  test('a change to the VDI shows in the next read (rows are not kept past a change)', async () => {
    const read = () =>
      fetch(`${srv.url}/v1/vdis/${id}/contents?format=raw`, { headers: { ...auth, Range: 'bytes=0-9' } });
    const before = await read();
    await before.arrayBuffer();
    const renamed = await fetch(`${srv.url}/v1/vdis/${id}`, {
      method: 'PATCH',
      headers: { ...auth, 'Content-Type': 'application/json' },
      body: JSON.stringify({ name_label: 'renamed' }),
    });
    assert.equal(renamed.status, 200);
    const after = await read();
    await after.arrayBuffer();
    assert.equal(after.headers.get('content-disposition'), 'attachment; filename="renamed.img"');
    const rewritten = await fetch(`${srv.url}/v1/vdis/${id}/contents?format=raw`, {
      method: 'PUT',
      headers: auth,
      body: new Uint8Array(seededBytes(SIZE, 4)),
    });
    assert.equal(rewritten.status, 200);
    const fresh = await read();
    assert.notEqual(fresh.headers.get('etag'), after.headers.get('etag'));
    assert.deepEqual(Buffer.from(await fresh.arrayBuffer()), seededBytes(SIZE, 4).subarray(0, 10));
    // Back as the other tests expect it.
    const restored = await fetch(`${srv.url}/v1/vdis/${id}/contents?format=raw`, {
      method: 'PUT',
      headers: auth,
      body: new Uint8Array(seededBytes(SIZE, 3)),
    });
    assert.equal(restored.status, 200);
  });

  test('the request id is echoed and the request logged (a success at debug)', async () => {
    const res = await fetch(`${srv.url}/v1/vdis/${id}/contents`, {
      headers: { ...auth, Range: 'bytes=0-9', 'X-Request-Id': 'lean-read-1' },
    });
    assert.equal(res.status, 206);
    assert.equal(res.headers.get('x-request-id'), 'lean-read-1');
    await res.arrayBuffer();
    const line = lines.map((l) => JSON.parse(l)).find((l) => l.req?.id === 'lean-read-1');
    assert.ok(line, 'a log line for the request');
    assert.equal(line.res.statusCode, 206);
    assert.equal(line.level, 20);
    assert.equal(line.req.headers.authorization, '[REDACTED]');
  });
});
