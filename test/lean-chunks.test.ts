/**
 * Chunk PUTs into an upload session (`PUT /v1/transfers/{id}/data` with
 * Content-Range) skip express (src/routes/lean.ts) and small chunks skip the
 * streaming machinery (src/transfer/small-chunk.ts). Each answer here, over a
 * real socket, is compared with express's answer to the same request: the
 * session id with one letter percent-encoded is the same id to express, and
 * the lean path leaves such a request to express. Every error a chunk PUT
 * can answer is sent; the bytes that land are checked.
 */
import assert from 'node:assert/strict';
import http from 'node:http';
import { Writable } from 'node:stream';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { api } from './helpers/api.js';
import { seededBytes, startServer, type TestServer } from './helpers/server.js';

const KiB = 1024;
const SIZE = 1024 * KiB;
const CHUNK = 64 * KiB;
const TOKEN = 'lean-chunks-secret';
const auth = { Authorization: `Bearer ${TOKEN}` };
const DATA = seededBytes(SIZE, 7);

interface Answer {
  status: number;
  headers: Record<string, string>;
  body: string;
}

interface Session {
  vdi?: string;
  id: string;
  token: string;
  url: string;
}

interface Put {
  /** The query after `?` (the token is added unless `noToken`). */
  query?: string;
  headers?: Record<string, string>;
  body?: Buffer;
  /** Send the body chunked (no Content-Length). */
  chunked?: boolean;
  noToken?: boolean;
}

/** The id with its first letter percent-encoded: the same session to express, not taken by the lean path. */
function encoded(id: string): string {
  const i = id.search(/[a-f]/);
  return `${id.slice(0, i)}%${id.charCodeAt(i).toString(16)}${id.slice(i + 1)}`;
}

/** A PUT over its own connection; status, headers (but the date and request id) and body, expiry masked. */
function put(base: string, path: string, p: Put): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const headers: Record<string, string | number> = { ...p.headers };
    if (p.chunked) headers['Transfer-Encoding'] = 'chunked';
    else if (p.body) headers['Content-Length'] ??= p.body.length;
    const req = http.request(`${base}${path}`, { method: 'PUT', headers, agent: false }, (res) => {
      const parts: Buffer[] = [];
      res.on('data', (c: Buffer) => parts.push(c));
      res.on('end', () => {
        const out: Record<string, string> = {};
        for (const [k, v] of Object.entries(res.headers)) {
          if (k !== 'date' && k !== 'x-request-id') out[k] = String(v);
        }
        const body = Buffer.concat(parts)
          .toString()
          .replace(/"expires_at":"[^"]+"/, '"expires_at":"…"')
          // How much of a body too long had come when it showed depends on the socket's reads.
          .replace(/\(\d+ bytes or more\)/, '(N bytes or more)');
        resolve({ status: res.statusCode ?? 0, headers: out, body });
      });
    });
    req.on('error', reject);
    req.end(p.body);
  });
}

/** The same PUT through the lean path and through express. */
async function both(srv: TestServer, s: Session, p: Put): Promise<{ lean: Answer; viaExpress: Answer }> {
  const query = [p.noToken ? '' : `token=${s.token}`, p.query ?? ''].filter(Boolean).join('&');
  const q = query ? `?${query}` : '';
  const lean = await put(srv.url, `/v1/transfers/${s.id}/data${q}`, p);
  const viaExpress = await put(srv.url, `/v1/transfers/${encoded(s.id)}/data${q}`, p);
  return { lean, viaExpress };
}

function range(start: number, length: number, total: number | string = SIZE): string {
  return `bytes ${start}-${start + length - 1}/${total}`;
}

describe('chunk PUTs answer as express does', () => {
  let srv: TestServer;
  const lines: string[] = [];

  /** A session on a VDI of its own (a VDI takes one upload at a time). */
  async function open(extra: Record<string, unknown> = {}): Promise<Session> {
    const disk = await api<{ id: string }>(
      srv.url,
      'POST',
      '/v1/vdis',
      { name_label: 'chunks', virtual_size: SIZE },
      auth,
    );
    assert.equal(disk.status, 201);
    const res = await api<Session>(
      srv.url,
      'POST',
      '/v1/transfers',
      { vdi: disk.body.id, direction: 'upload', format: 'raw', size: SIZE, ...extra },
      auth,
    );
    assert.equal(res.status, 201, JSON.stringify(res.body));
    return { ...res.body, vdi: disk.body.id };
  }

  before(async () => {
    const log = new Writable({
      write(chunk, _enc, done) {
        lines.push(...String(chunk).trim().split('\n'));
        done();
      },
    });
    srv = await startServer({ token: TOKEN, log, logLevel: 'debug' });
  });
  after(() => srv.close());

  test('a chunk with flush=n, then with flush=y, lands and is recorded as express records it', async () => {
    const s = await open();
    const chunk = DATA.subarray(CHUNK, 2 * CHUNK);
    const headers = { 'Content-Range': range(CHUNK, CHUNK), 'Content-Type': 'application/octet-stream' };
    const deferred = await both(srv, s, { query: 'flush=n', headers, body: chunk });
    assert.equal(deferred.lean.status, 200, deferred.lean.body);
    assert.deepEqual(deferred.lean, deferred.viaExpress);
    assert.equal(JSON.parse(deferred.lean.body).unflushed_bytes, CHUNK);
    const first = DATA.subarray(0, CHUNK);
    const flushed = await both(srv, s, { headers: { 'Content-Range': range(0, CHUNK) }, body: first });
    assert.equal(flushed.lean.status, 200, flushed.lean.body);
    assert.deepEqual(flushed.lean, flushed.viaExpress);
    // The flush point made the earlier flush=n chunk durable too.
    assert.deepEqual(JSON.parse(flushed.lean.body).received, [[0, 2 * CHUNK]]);
    assert.equal(flushed.lean.headers['upload-offset'], String(2 * CHUNK));
    assert.equal(flushed.lean.headers['upload-length'], String(SIZE));
  });

  test('the bytes of lean chunks (in any order, zeros among them) are the disk after finalize', async () => {
    const s = await open();
    const data = Buffer.from(DATA);
    data.fill(0, 3 * CHUNK, 5 * CHUNK); // all-zero chunks, and one half zero
    data.fill(0, 7 * CHUNK, 7 * CHUNK + CHUNK / 2);
    const order = [...Array(SIZE / CHUNK).keys()].reverse();
    for (const i of order) {
      const flush = i % 3 === 0 ? '' : 'flush=n';
      const a = await put(srv.url, `/v1/transfers/${s.id}/data?token=${s.token}${flush && `&${flush}`}`, {
        headers: { 'Content-Range': range(i * CHUNK, CHUNK) },
        body: data.subarray(i * CHUNK, (i + 1) * CHUNK),
      });
      assert.equal(a.status, 200, a.body);
    }
    const fin = await api<{ id: string }>(
      srv.url,
      'POST',
      `/v1/transfers/${s.id}/finalize?wait=60`,
      undefined,
      auth,
    );
    assert.equal(fin.status, 202, JSON.stringify(fin.body));
    const got = await fetch(`${srv.url}/v1/vdis/${s.vdi}/contents?format=raw`, { headers: auth });
    assert.ok(Buffer.from(await got.arrayBuffer()).equals(data), 'the disk holds the chunks sent');
  });

  test('Expect: 100-continue gets its 100, then the answer', async () => {
    const s = await open();
    const body = DATA.subarray(0, CHUNK);
    const answer = await new Promise<{ continued: boolean; status: number }>((resolve, reject) => {
      let continued = false;
      const req = http.request(`${srv.url}/v1/transfers/${s.id}/data?token=${s.token}`, {
        method: 'PUT',
        agent: false,
        headers: { 'Content-Range': range(0, CHUNK), 'Content-Length': CHUNK, Expect: '100-continue' },
      });
      req.on('continue', () => {
        continued = true;
        req.end(body);
      });
      req.on('response', (res) => {
        res.resume();
        res.on('end', () => resolve({ continued, status: res.statusCode ?? 0 }));
      });
      req.on('error', reject);
    });
    assert.deepEqual(answer, { continued: true, status: 200 });
  });

  test('a bearer transfer token works as ?token= does', async () => {
    const s = await open();
    const p: Put = {
      noToken: true,
      headers: { Authorization: `Bearer ${s.token}`, 'Content-Range': range(0, CHUNK) },
      body: DATA.subarray(0, CHUNK),
    };
    const { lean, viaExpress } = await both(srv, s, p);
    assert.equal(lean.status, 200, lean.body);
    assert.deepEqual(lean, viaExpress);
  });

  const chunk = DATA.subarray(0, CHUNK);
  const cr = { 'Content-Range': range(0, CHUNK) };
  const refusals: [string, string, (s: Session) => Put][] = [
    [
      'a wrong token',
      'TOKEN_INVALID',
      () => ({ noToken: true, query: 'token=nope', headers: cr, body: chunk }),
    ],
    ['no token', 'TOKEN_REQUIRED', () => ({ noToken: true, headers: cr, body: chunk })],
    ['a bad flush', 'INVALID_REQUEST', () => ({ query: 'flush=maybe', headers: cr, body: chunk })],
    ['a repeated flush', 'INVALID_REQUEST', () => ({ query: 'flush=n&flush=n', headers: cr, body: chunk })],
    [
      'a malformed Content-Range',
      'INVALID_CONTENT_RANGE',
      () => ({ headers: { 'Content-Range': 'bytes 0-/9' }, body: chunk }),
    ],
    [
      'a Content-Range ending before it starts',
      'INVALID_CONTENT_RANGE',
      () => ({ headers: { 'Content-Range': `bytes 9-0/${SIZE}` }, body: chunk }),
    ],
    [
      'a Content-Length that is not the range',
      'INVALID_CONTENT_RANGE',
      () => ({ headers: { 'Content-Range': range(0, 2 * CHUNK) }, body: chunk }),
    ],
    [
      'a chunk past the end',
      'CHUNK_PAST_END',
      () => ({ headers: { 'Content-Range': range(SIZE, CHUNK, '*') }, body: chunk }),
    ],
    [
      'a chunk naming another total',
      'CONFLICTING_LENGTH',
      () => ({ headers: { 'Content-Range': range(0, CHUNK, SIZE * 2) }, body: chunk }),
    ],
    [
      'a malformed Content-Digest',
      'INVALID_CONTENT_DIGEST',
      () => ({ headers: { ...cr, 'Content-Digest': 'sha-256=nope' }, body: chunk }),
    ],
    [
      'a Content-Digest that does not match',
      'DIGEST_MISMATCH',
      () => ({
        headers: { ...cr, 'Content-Digest': `sha-256=:${Buffer.alloc(32).toString('base64')}:` },
        body: chunk,
      }),
    ],
    [
      'a chunked body longer than its range',
      'CHUNK_TOO_LONG',
      () => ({ headers: { 'Content-Range': range(0, CHUNK / 2) }, body: chunk, chunked: true }),
    ],
    [
      'a chunked body shorter than its range',
      'CHUNK_INCOMPLETE',
      () => ({ headers: { 'Content-Range': range(0, 2 * CHUNK) }, body: chunk, chunked: true }),
    ],
  ];
  for (const [what, code, make] of refusals) {
    test(`${what}: ${code}`, async () => {
      const s = await open();
      const { lean, viaExpress } = await both(srv, s, make(s));
      assert.equal(JSON.parse(lean.body).error?.code, code, lean.body);
      assert.deepEqual(lean, viaExpress);
    });
  }

  test('once a right token has been taken, a wrong one is still refused, and the right one still works', async () => {
    // The session keeps the first token that matched and compares later ones with it.
    const s = await open();
    const other = await open();
    const at = (i: number) => ({ 'Content-Range': range(i * CHUNK, CHUNK) });
    const body = (i: number) => DATA.subarray(i * CHUNK, (i + 1) * CHUNK);
    // One character changed (same length), shorter, longer, another session's token; by query and by bearer.
    const flipped = `${s.token.slice(0, -1)}${s.token.endsWith('A') ? 'B' : 'A'}`;
    const wrong = [flipped, s.token.slice(0, -1), `${s.token}x`, other.token];
    // A wrong token before any right one is refused too, and keeps nothing.
    const before = await put(srv.url, `/v1/transfers/${s.id}/data?token=${flipped}&flush=n`, {
      headers: at(0),
      body: body(0),
    });
    assert.equal(before.status, 403, before.body);
    const first = await put(srv.url, `/v1/transfers/${s.id}/data?token=${s.token}&flush=n`, {
      headers: at(0),
      body: body(0),
    });
    assert.equal(first.status, 200, first.body);
    for (const token of wrong) {
      const byQuery = await both(srv, s, {
        noToken: true,
        query: `token=${encodeURIComponent(token)}&flush=n`,
        headers: at(1),
        body: body(1),
      });
      assert.equal(byQuery.lean.status, 403, byQuery.lean.body);
      assert.equal(JSON.parse(byQuery.lean.body).error.code, 'TOKEN_INVALID');
      assert.deepEqual(byQuery.lean, byQuery.viaExpress);
      const byBearer = await both(srv, s, {
        noToken: true,
        query: 'flush=n',
        headers: { ...at(1), Authorization: `Bearer ${token}` },
        body: body(1),
      });
      assert.equal(byBearer.lean.status, 403, byBearer.lean.body);
      assert.deepEqual(byBearer.lean, byBearer.viaExpress);
    }
    const state = await api<{ unflushed_bytes: number; received: [number, number][] }>(
      srv.url,
      'GET',
      `/v1/transfers/${s.id}`,
      undefined,
      auth,
    );
    assert.equal(state.body.unflushed_bytes + state.body.received.reduce((n, [a, b]) => n + b - a, 0), CHUNK);
    // The other session's own token still works on it, and this session's on this one.
    for (const [session, i] of [
      [other, 0],
      [s, 1],
    ] as const) {
      const ok = await put(srv.url, `/v1/transfers/${session.id}/data?token=${session.token}`, {
        headers: at(i),
        body: body(i),
      });
      assert.equal(ok.status, 200, ok.body);
    }
    const after = await api<{ received: [number, number][] }>(
      srv.url,
      'GET',
      `/v1/transfers/${s.id}`,
      undefined,
      auth,
    );
    assert.deepEqual(after.body.received, [[0, 2 * CHUNK]]);
  });

  test('the management token writes a chunk too (through express)', async () => {
    const s = await open();
    const { lean, viaExpress } = await both(srv, s, {
      noToken: true,
      headers: { ...auth, ...cr },
      body: chunk,
    });
    assert.equal(lean.status, 200, lean.body);
    assert.deepEqual(lean, viaExpress);
  });

  test('a chunk into an unknown session: 404', async () => {
    const s = { id: '00000000-0000-4000-8000-00000000abcd', token: 'x', url: '' };
    const { lean, viaExpress } = await both(srv, s, { headers: cr, body: chunk });
    assert.equal(lean.status, 404, lean.body);
    assert.deepEqual(lean, viaExpress);
  });

  test('a chunk into a cancelled session: TRANSFER_NOT_ACTIVE', async () => {
    const s = await open();
    assert.equal((await api(srv.url, 'DELETE', `/v1/transfers/${s.id}`, undefined, auth)).status, 200);
    const { lean, viaExpress } = await both(srv, s, { headers: cr, body: chunk });
    assert.equal(JSON.parse(lean.body).error.code, 'TRANSFER_NOT_ACTIVE', lean.body);
    assert.deepEqual(lean, viaExpress);
  });

  test('a chunk into a download session: WRONG_DIRECTION', async () => {
    const s = await open({ direction: 'download', size: undefined });
    const { lean, viaExpress } = await both(srv, s, { headers: cr, body: chunk });
    assert.equal(JSON.parse(lean.body).error.code, 'WRONG_DIRECTION', lean.body);
    assert.deepEqual(lean, viaExpress);
    await api(srv.url, 'DELETE', `/v1/transfers/${s.id}`, undefined, auth);
  });

  test('a chunk into an expired session: TRANSFER_EXPIRED', async () => {
    const s = await open({ ttl_seconds: 1 });
    await sleep(1100);
    const { lean, viaExpress } = await both(srv, s, { headers: cr, body: chunk });
    assert.equal(JSON.parse(lean.body).error.code, 'TRANSFER_EXPIRED', lean.body);
    assert.deepEqual(lean, viaExpress);
  });

  test('a connection broken mid-chunk keeps the bytes that arrived', async () => {
    const s = await open();
    const half = CHUNK / 2;
    await new Promise<void>((resolve) => {
      const req = http.request(`${srv.url}/v1/transfers/${s.id}/data?token=${s.token}`, {
        method: 'PUT',
        agent: false,
        headers: { 'Content-Range': range(0, CHUNK), 'Content-Length': CHUNK },
      });
      req.on('error', () => resolve());
      req.write(DATA.subarray(0, half), () => setTimeout(() => req.destroy(), 100));
      req.on('close', () => resolve());
    });
    // The session's state waits for the writes in progress: it sees the break.
    const state = await api<{ received: [number, number][] }>(
      srv.url,
      'GET',
      `/v1/transfers/${s.id}`,
      undefined,
      auth,
    );
    assert.equal(state.status, 200);
    assert.deepEqual(state.body.received, [[0, half]]);
    const fin = await put(srv.url, `/v1/transfers/${s.id}/data?token=${s.token}`, {
      headers: { 'Content-Range': range(half, SIZE - half) },
      body: DATA.subarray(half),
    });
    assert.equal(fin.status, 200, fin.body);
    assert.equal(JSON.parse(fin.body).upload_offset, SIZE);
  });

  test('a lean chunk is logged with its request id, at debug', async () => {
    const s = await open();
    const a = await put(srv.url, `/v1/transfers/${s.id}/data?token=${s.token}`, {
      headers: { ...cr, 'X-Request-Id': 'lean-chunk-1' },
      body: chunk,
    });
    assert.equal(a.status, 200);
    const line = lines.map((l) => JSON.parse(l)).find((l) => l.req?.id === 'lean-chunk-1');
    assert.ok(line, 'a log line for the request');
    assert.equal(line.level, 20);
    assert.equal(line.res.statusCode, 200);
    assert.doesNotMatch(line.req.url, new RegExp(s.token));
  });
});
