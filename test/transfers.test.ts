import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { api, createVdi, sha256Url, type TransferJson } from './helpers/api.js';
import { failNthDirectWrite } from './helpers/faults.js';
import { prng, seededBytes, startServer, type TestServer } from './helpers/server.js';
import { waitFor } from './helpers/wait.js';

const MiB = 1024 * 1024;
type ErrorBody = { error: { code: string; message: string; details?: Record<string, unknown> } };
type Task = { id: string; status: string; error: { code: string } | null; bytes_done: number };

const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

async function putChunk(
  url: string,
  data: Buffer,
  start: number,
  total: number | '*',
  headers: Record<string, string> = {},
) {
  return fetch(url, {
    method: 'PUT',
    headers: { 'content-range': `bytes ${start}-${start + data.length - 1}/${total}`, ...headers },
    body: new Uint8Array(data),
  });
}

describe('resumable transfer sessions', () => {
  let srv: TestServer;
  before(async () => {
    srv = await startServer();
  });
  after(() => srv.close());

  const open = async (body: Record<string, unknown>) => {
    const res = await api<TransferJson>(srv.url, 'POST', '/v1/transfers', body);
    assert.equal(res.status, 201, JSON.stringify(res.body));
    return res.body;
  };
  const finalize = async (t: TransferJson) =>
    api<Task>(srv.url, 'POST', `/v1/transfers/${t.id}/finalize?token=${t.token}&wait=30`);
  /** The error code of a finalize that is refused (409 while bytes are missing or a chunk is landing). */
  const finalizeCode = async (t: TransferJson) => {
    const res = await api<ErrorBody>(srv.url, 'POST', `/v1/transfers/${t.id}/finalize?token=${t.token}`);
    assert.equal(res.status, 409, JSON.stringify(res.body));
    return res.body.error.code;
  };
  /** A session as the list shows it: reading it there renews nothing. */
  const listed = async (t: TransferJson) => {
    const res = await api<TransferJson[]>(srv.url, 'GET', `/v1/transfers?vdi=${t.vdi}`);
    const found = res.body.find((x) => x.id === t.id);
    assert.ok(found, `transfer ${t.id} is listed`);
    return found;
  };

  test('a disk that fills up mid-chunk (ENOSPC): 507, only bytes on disk count, and the resent rest finalizes exact', async () => {
    const vdi = await createVdi(srv.url, 16 * MiB);
    const data = seededBytes(16 * MiB, 11);
    const t = await open({ vdi: vdi.id, direction: 'upload', format: 'raw', size: data.length });
    // The second gathered 4 MiB write fails as a full disk fails it.
    const fault = failNthDirectWrite(2);
    let res: Response;
    try {
      res = await putChunk(t.url, data, 0, data.length);
    } finally {
      fault.restore();
    }
    assert.equal(res.status, 507);
    assert.equal(((await res.json()) as ErrorBody).error.code, 'INSUFFICIENT_SPACE');
    const offset = Number((await fetch(t.url, { method: 'HEAD' })).headers.get('upload-offset'));
    assert.ok(offset <= 4 * MiB, `nothing past the failed write counts as received (offset ${offset})`);
    const rest = await putChunk(t.url, data.subarray(offset), offset, data.length);
    assert.equal(rest.status, 200, await rest.text());
    assert.equal((await finalize(t)).body.status, 'success');
    assert.equal(await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`), sha256(data));
  });

  test('a chunk whose client went silent does not hold finalize once every byte has come another way', async () => {
    const vdi = await createVdi(srv.url, 4 * MiB);
    const data = seededBytes(4 * MiB, 23);
    const t = await open({ vdi: vdi.id, direction: 'upload', format: 'raw', size: data.length });
    // A client sends half of a 2 MiB chunk, then goes silent without closing its connection
    // (a dropped link): the server cannot tell it from a slow one.
    const { hostname, port, pathname, search } = new URL(t.url);
    const silent = net.connect(Number(port), hostname);
    let answer = '';
    silent.on('data', (d) => {
      answer += d;
    });
    silent.on('error', () => {});
    silent.write(
      `PUT ${pathname}${search} HTTP/1.1\r\nHost: ${hostname}\r\nContent-Range: bytes 0-${2 * MiB - 1}/${data.length}\r\n` +
        `Content-Length: ${2 * MiB}\r\n\r\n`,
    );
    silent.write(data.subarray(0, MiB));
    try {
      // While bytes of its range are missing, the silent chunk may still bring them: busy
      // (TRANSFER_INCOMPLETE only until the server has seen the silent request begin).
      let code = '';
      for (let i = 0; i < 100 && code !== 'TRANSFER_BUSY'; i++) {
        if (i) await sleep(50);
        const early = await finalize(t);
        assert.equal(early.status, 409);
        code = (early.body as unknown as ErrorBody).error.code;
      }
      assert.equal(code, 'TRANSFER_BUSY');
      // The client comes back on a new connection and sends everything.
      for (const start of [0, 2 * MiB]) {
        const res = await putChunk(t.url, data.subarray(start, start + 2 * MiB), start, data.length);
        assert.equal(res.status, 200, await res.text());
      }
      const started = Date.now();
      const fin = await finalize(t);
      assert.equal(fin.status, 202, JSON.stringify(fin.body));
      assert.equal(fin.body.status, 'success');
      assert.ok(Date.now() - started < 10_000, 'finalize did not wait for the idle timeout');
      assert.equal(await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`), sha256(data));
      // The silent request is told why it was ended, should its client still be listening.
      for (let i = 0; i < 50 && !answer.includes('\r\n\r\n{'); i++) await sleep(20);
      assert.match(answer, /^HTTP\/1\.1 409/);
      assert.match(answer, /CHUNK_SUPERSEDED/);
    } finally {
      silent.destroy();
    }
  });

  test('chunks in random order, in parallel, with overlapping resends, finalize to the exact bytes', async () => {
    const vdi = await createVdi(srv.url, 16 * MiB);
    const data = seededBytes(16 * MiB, 1);
    data.fill(0, 4 * MiB, 6 * MiB); // a hole in the middle
    const t = await open({ vdi: vdi.id, direction: 'upload', format: 'raw', size: data.length });
    assert.match(t.url, new RegExp(`/v1/transfers/${t.id}/data\\?token=`));
    const CHUNK = MiB;
    const order = [...Array(16).keys()];
    const rnd = prng(5);
    order.sort(() => rnd() - 0.5);
    // four at a time, each resent half-overlapping its neighbour
    for (let i = 0; i < order.length; i += 4) {
      await Promise.all(
        order.slice(i, i + 4).map(async (k) => {
          const start = Math.max(0, k * CHUNK - CHUNK / 2);
          const res = await putChunk(t.url, data.subarray(start, (k + 1) * CHUNK), start, data.length);
          assert.equal(res.status, 200, await res.clone().text());
        }),
      );
    }
    const head = await fetch(t.url, { method: 'HEAD' });
    assert.equal(head.headers.get('upload-offset'), String(data.length));
    assert.equal(head.headers.get('upload-length'), String(data.length));
    const state = await api<TransferJson>(srv.url, 'GET', `/v1/transfers/${t.id}?token=${t.token}`);
    assert.deepEqual(state.body.received, [[0, data.length]]);
    const task = await finalize(t);
    assert.equal(task.status, 202);
    assert.equal(task.body.status, 'success', JSON.stringify(task.body));
    assert.equal(await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`), sha256(data));
    const after = await api<TransferJson>(srv.url, 'GET', `/v1/transfers/${t.id}`);
    assert.equal(after.body.state, 'committed');
  });

  test('HEAD reports the contiguous offset; a curl-style resume sends only the rest', async () => {
    const vdi = await createVdi(srv.url, 4 * MiB);
    const data = seededBytes(4 * MiB, 2);
    const t = await open({ vdi: vdi.id, direction: 'upload', size: data.length });
    await putChunk(t.url, data.subarray(0, MiB), 0, data.length);
    await putChunk(t.url, data.subarray(3 * MiB), 3 * MiB, data.length);
    const head = await fetch(t.url, { method: 'HEAD' });
    assert.equal(head.headers.get('upload-offset'), String(MiB));
    const early = await api<ErrorBody>(srv.url, 'POST', `/v1/transfers/${t.id}/finalize?token=${t.token}`);
    assert.equal(early.status, 409);
    assert.equal(early.body.error.code, 'TRANSFER_INCOMPLETE');
    assert.deepEqual((early.body.error.details as { missing: number[][] }).missing, [[MiB, 3 * MiB]]);
    await putChunk(t.url, data.subarray(MiB, 3 * MiB), MiB, data.length);
    assert.equal((await finalize(t)).body.status, 'success');
    assert.equal(await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`), sha256(data));
  });

  test('a whole stream without Content-Range, with a checksum verified at finalize', async () => {
    const vdi = await createVdi(srv.url, 2 * MiB);
    const data = seededBytes(2 * MiB, 3);
    const t = await open({ vdi: vdi.id, direction: 'upload', checksum: `sha256:${sha256(data)}` });
    const put = await fetch(t.url, { method: 'PUT', body: new Uint8Array(data) });
    assert.equal(put.status, 200);
    assert.equal(put.headers.get('upload-offset'), String(data.length));
    assert.equal((await finalize(t)).body.status, 'success');
  });

  test('a wrong checksum fails the task with CHECKSUM_MISMATCH and leaves the VDI unchanged', async () => {
    const vdi = await createVdi(srv.url, MiB);
    const before = await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`);
    const data = seededBytes(MiB, 4);
    const t = await open({
      vdi: vdi.id,
      direction: 'upload',
      size: MiB,
      checksum: `sha256:${'0'.repeat(64)}`,
    });
    await fetch(t.url, { method: 'PUT', body: new Uint8Array(data) });
    const task = await finalize(t);
    assert.equal(task.body.status, 'failure');
    assert.equal(task.body.error?.code, 'CHECKSUM_MISMATCH');
    assert.equal(await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`), before);
    const seenByHolder = await api<TransferJson & { error: { code: string } | null }>(
      srv.url,
      'GET',
      `/v1/transfers/${t.id}?token=${t.token}`,
    );
    assert.equal(seenByHolder.body.state, 'failed');
    assert.equal(seenByHolder.body.error?.code, 'CHECKSUM_MISMATCH', 'the token holder learns why');
  });

  test('a chunk whose Content-Digest does not match is discarded with 400; the right one counts', async () => {
    const vdi = await createVdi(srv.url, MiB);
    const data = seededBytes(MiB, 6);
    const t = await open({ vdi: vdi.id, direction: 'upload', size: MiB });
    const good = `sha-256=:${createHash('sha256').update(data).digest('base64')}:`;
    const bad = `sha-256=:${createHash('sha256').update('other').digest('base64')}:`;
    const refused = await putChunk(t.url, data, 0, MiB, { 'content-digest': bad });
    assert.equal(refused.status, 400);
    assert.equal(((await refused.json()) as ErrorBody).error.code, 'DIGEST_MISMATCH');
    const head = await fetch(t.url, { method: 'HEAD' });
    assert.equal(head.headers.get('upload-offset'), '0', 'a discarded chunk does not count');
    const ok = await putChunk(t.url, data, 0, MiB, { 'content-digest': good });
    assert.equal(ok.status, 200);
    assert.equal((await finalize(t)).body.status, 'success');
    assert.equal(await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`), sha256(data));
  });

  test('a bad-digest chunk racing a good one over the same bytes never undoes what the good one delivered', async () => {
    const vdi = await createVdi(srv.url, MiB);
    const data = seededBytes(MiB, 21);
    const t = await open({ vdi: vdi.id, direction: 'upload', size: MiB });
    const bad = `sha-256=:${createHash('sha256').update('something else').digest('base64')}:`;
    // The bad chunk starts first and stalls half-way...
    let release: () => void = () => {};
    const stalled = new Promise<void>((r) => {
      release = r;
    });
    const slowBody = new ReadableStream<Uint8Array>({
      async start(c) {
        c.enqueue(new Uint8Array(data.subarray(0, MiB / 2)));
        await stalled;
        c.enqueue(new Uint8Array(data.subarray(MiB / 2)));
        c.close();
      },
    });
    const badPut = fetch(t.url, {
      method: 'PUT',
      headers: { 'content-range': `bytes 0-${MiB - 1}/${MiB}`, 'content-digest': bad },
      body: slowBody,
      duplex: 'half',
    } as RequestInit);
    // Finalize says TRANSFER_BUSY while a chunk is being received: the bad one has begun.
    await waitFor('the bad chunk to be landing', async () => (await finalizeCode(t)) === 'TRANSFER_BUSY');
    // ...while the good one lands whole and is recorded...
    assert.equal((await putChunk(t.url, data, 0, MiB)).status, 200);
    // ...and the bad one cannot have ended: half its body is held back until now.
    release();
    const refused = await badPut;
    assert.equal(refused.status, 400);
    assert.equal(((await refused.json()) as ErrorBody).error.code, 'DIGEST_MISMATCH');
    assert.equal((await finalize(t)).body.status, 'success');
    assert.equal(await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`), sha256(data));
  });

  test('a chunk with an unknown total cannot land past what the VDI can hold', async () => {
    const vdi = await createVdi(srv.url, 4 * MiB);
    const t = await open({ vdi: vdi.id, direction: 'upload' });
    const far = await putChunk(t.url, Buffer.alloc(4096, 1), 5 * 1024 ** 4, '*');
    assert.equal(far.status, 413);
    assert.equal(((await far.json()) as ErrorBody).error.code, 'CHUNK_PAST_END');
    await api(srv.url, 'DELETE', `/v1/transfers/${t.id}?token=${t.token}`);
  });

  test('chunks that contradict or overrun the declared total are refused', async () => {
    const vdi = await createVdi(srv.url, MiB);
    const t = await open({ vdi: vdi.id, direction: 'upload', size: 1000 });
    const conflicting = await putChunk(t.url, Buffer.alloc(10, 1), 0, 2000);
    assert.equal(conflicting.status, 409);
    assert.equal(((await conflicting.json()) as ErrorBody).error.code, 'CONFLICTING_LENGTH');
    const past = await putChunk(t.url, Buffer.alloc(10, 1), 995, '*');
    assert.equal(past.status, 413);
    assert.equal(((await past.json()) as ErrorBody).error.code, 'CHUNK_PAST_END');
    const malformed = await fetch(t.url, {
      method: 'PUT',
      headers: { 'content-range': 'bytes 5-1/1000' },
      body: 'x',
    });
    assert.equal(malformed.status, 400);
    assert.equal(((await malformed.json()) as ErrorBody).error.code, 'INVALID_CONTENT_RANGE');
    await api(srv.url, 'DELETE', `/v1/transfers/${t.id}`);
    const tooBig = await api<ErrorBody>(srv.url, 'POST', '/v1/transfers', {
      vdi: vdi.id,
      direction: 'upload',
      size: 2 * MiB,
    });
    assert.equal(tooBig.status, 413);
  });

  test('a chunked body that ends before its Content-Range is 400 CHUNK_INCOMPLETE; what arrived is kept', async () => {
    const vdi = await createVdi(srv.url, MiB);
    const t = await open({ vdi: vdi.id, direction: 'upload', size: MiB });
    const data = seededBytes(MiB, 41);
    const sent = 300 * 1024;
    // Chunked, so no Content-Length gives the shortfall away before the body ends.
    const short = await fetch(t.url, {
      method: 'PUT',
      headers: { 'content-range': `bytes 0-${MiB - 1}/${MiB}` },
      body: new ReadableStream({
        start(c) {
          c.enqueue(new Uint8Array(data.subarray(0, sent)));
          c.close();
        },
      }),
      duplex: 'half',
    } as RequestInit & { duplex: 'half' });
    const body = (await short.json()) as ErrorBody;
    assert.equal(short.status, 400, JSON.stringify(body));
    assert.equal(body.error.code, 'CHUNK_INCOMPLETE');
    assert.equal(body.error.details?.received, sent);
    const offset = Number((await fetch(t.url, { method: 'HEAD' })).headers.get('upload-offset'));
    assert.equal(offset, sent, 'the bytes that arrived count');
    const rest = await putChunk(t.url, data.subarray(sent), sent, MiB);
    assert.equal(rest.status, 200, await rest.text());
    assert.equal((await finalize(t)).body.status, 'success');
    assert.equal(await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`), sha256(data));
  });

  test('a malformed checksum or Content-Digest is 400 saying the form expected; nothing lands', async () => {
    const vdi = await createVdi(srv.url, MiB);
    for (const checksum of ['sha256:abc', 'crc32:00000000', `sha256${'0'.repeat(64)}`]) {
      const res = await api<ErrorBody>(srv.url, 'POST', '/v1/transfers', {
        vdi: vdi.id,
        direction: 'upload',
        checksum,
      });
      assert.equal(res.status, 400, checksum);
      assert.equal(res.body.error.code, 'INVALID_CHECKSUM', checksum);
      assert.match(res.body.error.message, /sha256:<64 hex digits>/);
    }
    const t = await open({ vdi: vdi.id, direction: 'upload', size: MiB });
    const chunk = seededBytes(4096, 42);
    for (const digest of ['sha-256=abc', 'sha-256=:AAAA:', 'sha-256']) {
      const res = await putChunk(t.url, chunk, 0, MiB, { 'content-digest': digest });
      assert.equal(res.status, 400, digest);
      assert.equal(((await res.json()) as ErrorBody).error.code, 'INVALID_CONTENT_DIGEST', digest);
    }
    assert.equal((await listed(t)).bytes_received, 0);
    await api(srv.url, 'DELETE', `/v1/transfers/${t.id}?token=${t.token}`);
  });

  test('one writer per VDI: a second upload session and deleting the VDI are refused with VDI_BUSY', async () => {
    const vdi = await createVdi(srv.url, MiB);
    const t = await open({ vdi: vdi.id, direction: 'upload' });
    const second = await api<ErrorBody>(srv.url, 'POST', '/v1/transfers', {
      vdi: vdi.id,
      direction: 'upload',
    });
    assert.equal(second.status, 409);
    assert.equal(second.body.error.code, 'VDI_BUSY');
    const del = await api<ErrorBody>(srv.url, 'DELETE', `/v1/vdis/${vdi.id}`);
    assert.equal(del.status, 409);
    assert.equal(del.body.error.code, 'VDI_BUSY');
    const oneShot = await fetch(`${srv.url}/v1/vdis/${vdi.id}/contents`, { method: 'PUT', body: 'x' });
    assert.equal(oneShot.status, 409);
    const cancelled = await api<TransferJson>(srv.url, 'DELETE', `/v1/transfers/${t.id}?token=${t.token}`);
    assert.equal(cancelled.body.state, 'cancelled');
    const task = await api<Task>(srv.url, 'GET', `/v1/tasks/${t.task_id}`);
    assert.equal(task.body.status, 'cancelled');
    assert.equal((await api(srv.url, 'DELETE', `/v1/vdis/${vdi.id}`)).status, 204);
  });

  test('cancelling the task of an upload session cancels the session and removes its staging file', async () => {
    const vdi = await createVdi(srv.url, MiB);
    const t = await open({ vdi: vdi.id, direction: 'upload', size: MiB });
    assert.equal((await putChunk(t.url, seededBytes(1000, 9), 0, MiB)).status, 200);
    const stagingDir = path.join(srv.dataDir, 'srs', 'local', '.staging');
    const staged = async () =>
      (await fsp.readdir(stagingDir)).filter((n) => n.startsWith(`transfer-${t.id}.`));
    assert.deepEqual(await staged(), [`transfer-${t.id}.raw`], 'the chunk is in the staging file');
    assert.equal((await api(srv.url, 'POST', `/v1/tasks/${t.task_id}/cancel`)).status, 202);
    await waitFor(
      'the session to be cancelled',
      async () =>
        (await api<TransferJson>(srv.url, 'GET', `/v1/transfers/${t.id}`)).body.state === 'cancelled',
    );
    await waitFor('the staging file to be removed', async () => (await staged()).length === 0);
    const late = await putChunk(t.url, seededBytes(1000, 9), 1000, MiB);
    assert.equal(late.status, 409);
    assert.equal(((await late.json()) as ErrorBody).error.code, 'TRANSFER_NOT_ACTIVE');
  });

  test("token scope: no token, another transfer's token and an expired token are refused; nothing is written", async () => {
    const a = await createVdi(srv.url, MiB);
    const b = await createVdi(srv.url, MiB);
    const ta = await open({ vdi: a.id, direction: 'upload', size: MiB });
    const tb = await open({ vdi: b.id, direction: 'upload', size: MiB, ttl_seconds: 1 });
    const dataUrl = `${srv.url}/v1/transfers/${ta.id}/data`;
    const none = await putChunk(dataUrl, Buffer.alloc(512, 1), 0, MiB);
    assert.equal(none.status, 401);
    assert.equal(((await none.json()) as ErrorBody).error.code, 'TOKEN_REQUIRED');
    const other = await putChunk(`${dataUrl}?token=${tb.token}`, Buffer.alloc(512, 1), 0, MiB);
    assert.equal(other.status, 403);
    assert.equal(((await other.json()) as ErrorBody).error.code, 'TOKEN_INVALID');
    const bearer = await putChunk(dataUrl, Buffer.alloc(512, 1), 0, MiB, {
      authorization: `Bearer ${tb.token}`,
    });
    assert.equal(bearer.status, 403);
    const unknown = await putChunk(`${srv.url}/v1/transfers/nope/data?token=x`, Buffer.alloc(512, 1), 0, MiB);
    assert.equal(unknown.status, 404);
    assert.equal(((await unknown.json()) as ErrorBody).error.code, 'TRANSFER_NOT_FOUND');
    const expiresAt = Date.parse(tb.expires_at);
    await waitFor('the 1-second session to pass its expiry', () => Date.now() > expiresAt);
    const expired = await putChunk(tb.url, Buffer.alloc(512, 1), 0, MiB);
    assert.equal(expired.status, 410);
    assert.equal(((await expired.json()) as ErrorBody).error.code, 'TRANSFER_EXPIRED');
    const state = await api<TransferJson>(srv.url, 'GET', `/v1/transfers/${ta.id}`);
    assert.equal(state.body.bytes_received, 0, 'nothing was written');
    await srv.services.transfers.reapExpired();
    const reaped = await api<TransferJson>(srv.url, 'GET', `/v1/transfers/${tb.id}`);
    assert.equal(reaped.body.state, 'expired');
    const task = await api<Task>(srv.url, 'GET', `/v1/tasks/${tb.task_id}`);
    assert.equal(task.body.status, 'failure');
    assert.equal(task.body.error?.code, 'TRANSFER_EXPIRED');
  });

  test('a download session serves ranges without the management token and counts bytes on its task', async () => {
    const vdi = await createVdi(srv.url, 4 * MiB);
    const data = seededBytes(4 * MiB, 12);
    await fetch(`${srv.url}/v1/vdis/${vdi.id}/contents`, { method: 'PUT', body: new Uint8Array(data) });
    const t = await open({ vdi: vdi.id, direction: 'download', format: 'raw' });
    const head = await fetch(t.url, { method: 'HEAD' });
    const etag = head.headers.get('etag')!;
    assert.equal(head.headers.get('content-length'), String(data.length));
    const part = await fetch(t.url, { headers: { range: 'bytes=1000-1999', 'if-range': etag } });
    assert.equal(part.status, 206);
    assert.ok(Buffer.from(await part.arrayBuffer()).equals(data.subarray(1000, 2000)));
    const task = await api<Task>(srv.url, 'GET', `/v1/tasks/${t.task_id}`);
    assert.equal(task.body.bytes_done, 1000);
    const write = await putChunk(t.url, Buffer.alloc(10), 0, 10);
    assert.equal(write.status, 409);
    assert.equal(((await write.json()) as ErrorBody).error.code, 'WRONG_DIRECTION');
    const done = await api<TransferJson>(srv.url, 'DELETE', `/v1/transfers/${t.id}?token=${t.token}`);
    assert.equal(done.body.state, 'committed');
    assert.equal((await fetch(t.url)).status, 409, 'an ended download session serves nothing');
  });

  test("an upload session's data cannot be read: 409 WRONG_DIRECTION", async () => {
    const vdi = await createVdi(srv.url, MiB);
    const t = await open({ vdi: vdi.id, direction: 'upload', size: MiB });
    const read = await api<ErrorBody>(srv.url, 'GET', new URL(t.url).pathname + new URL(t.url).search);
    assert.equal(read.status, 409);
    assert.equal(read.body.error.code, 'WRONG_DIRECTION');
    assert.match(read.body.error.message, /upload/);
    await api(srv.url, 'DELETE', `/v1/transfers/${t.id}?token=${t.token}`);
  });

  test('finalize before the upload length is known is 409 SIZE_UNKNOWN; once a chunk names the total it commits', async () => {
    const vdi = await createVdi(srv.url, MiB);
    const t = await open({ vdi: vdi.id, direction: 'upload' });
    const data = seededBytes(64 * 1024, 31);
    const partial = await putChunk(t.url, data.subarray(0, 4096), 0, '*');
    assert.equal(partial.status, 200, await partial.text());
    assert.equal(await finalizeCode(t), 'SIZE_UNKNOWN');
    const rest = await putChunk(t.url, data.subarray(4096), 4096, data.length);
    assert.equal(rest.status, 200, await rest.text());
    assert.equal((await finalize(t)).body.status, 'success');
    assert.equal(
      await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`),
      sha256(Buffer.concat([data, Buffer.alloc(MiB - data.length)])),
    );
  });

  test('while a session is being committed it takes no data (TRANSFER_NOT_OPEN) and cannot be cancelled (TRANSFER_FINALIZING)', async () => {
    // A 1 GiB upload of zeros (no bytes cross the wire) whose declared checksum is verified at
    // finalize: hashing it keeps the session in `finalizing` long enough to send two requests.
    const size = 1024 * MiB;
    const vdi = await createVdi(srv.url, size);
    const t = await open({ vdi: vdi.id, direction: 'upload', size, checksum: `sha256:${'0'.repeat(64)}` });
    const zero = await api(srv.url, 'PATCH', new URL(t.url).pathname + new URL(t.url).search, {
      op: 'zero',
      offset: 0,
      size,
    });
    assert.equal(zero.status, 200, JSON.stringify(zero.body));
    const finalizing = finalize(t);
    await waitFor('the session to be finalizing', async () => (await listed(t)).state !== 'open');
    const write = await putChunk(t.url, Buffer.alloc(512, 1), 0, size);
    const writeBody = (await write.json()) as ErrorBody;
    assert.equal(
      writeBody.error.code,
      'TRANSFER_NOT_OPEN',
      `the write reached the session while it was committed: ${JSON.stringify(writeBody)}`,
    );
    assert.equal(write.status, 409);
    const cancel = await api<ErrorBody>(srv.url, 'DELETE', `/v1/transfers/${t.id}?token=${t.token}`);
    assert.equal(cancel.status, 409);
    assert.equal(cancel.body.error.code, 'TRANSFER_FINALIZING');
    assert.equal((await listed(t)).state, 'finalizing', 'both were answered while the commit ran');
    // The commit is cut short by cancelling its task, which the holder of the session cannot do.
    assert.equal((await api(srv.url, 'POST', `/v1/tasks/${t.task_id}/cancel`)).status, 202);
    assert.equal((await finalizing).body.status, 'cancelled');
    assert.notEqual((await listed(t)).state, 'committed');
  });

  /** Sends `request` and checks that it moved the session's expiry to its own time plus the ttl. */
  async function assertRenews(t: TransferJson, what: string, request: () => Promise<Response>) {
    const earlier = Date.parse((await listed(t)).expires_at);
    // A renewal must show: the clock moves past the last one first.
    await waitFor('the clock to move', () => Date.now() > earlier - t.ttl_seconds * 1000);
    const sent = Date.now();
    const res = await request();
    assert.ok(res.ok, `${what}: ${res.status} ${await res.text()}`);
    const answered = Date.now();
    const expires = Date.parse((await listed(t)).expires_at);
    assert.ok(
      expires >= sent + t.ttl_seconds * 1000 && expires <= answered + t.ttl_seconds * 1000,
      `${what} renews the session: it expires at ${new Date(expires).toISOString()}, ` +
        `${t.ttl_seconds} s after a request sent at ${new Date(sent).toISOString()}`,
    );
  }

  test('every request renews an upload session: it expires ttl_seconds after the last one', async () => {
    const vdi = await createVdi(srv.url, MiB);
    const t = await open({ vdi: vdi.id, direction: 'upload', size: MiB, ttl_seconds: 600 });
    const data = seededBytes(8192, 31);
    const state = `${srv.url}/v1/transfers/${t.id}?token=${t.token}`;
    await assertRenews(t, 'a chunk', () => putChunk(t.url, data.subarray(0, 4096), 0, MiB));
    await assertRenews(t, 'HEAD for the offset', () => fetch(t.url, { method: 'HEAD' }));
    await assertRenews(t, 'GET of its state', () => fetch(state));
    await assertRenews(t, 'a zero op', () =>
      fetch(t.url, {
        method: 'PATCH',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ op: 'zero', offset: 8192, size: MiB - 8192 }),
      }),
    );
    await assertRenews(t, 'the next chunk', () => putChunk(t.url, data.subarray(4096), 4096, MiB));
    await srv.services.transfers.reapExpired();
    assert.equal((await listed(t)).state, 'open', 'a renewed session is not reaped');
    assert.equal((await finalize(t)).body.status, 'success');
  });

  test('a download session is renewed by each request, and by a long download as it streams', async () => {
    // An empty 256 MiB disk: its raw export is 256 MiB of zeros, far more than the socket buffers hold.
    const vdi = await createVdi(srv.url, 256 * MiB);
    const t = await open({ vdi: vdi.id, direction: 'download', format: 'raw', ttl_seconds: 600 });
    await assertRenews(t, 'HEAD', () => fetch(t.url, { method: 'HEAD' }));
    await assertRenews(t, 'a range', () => fetch(t.url, { headers: { range: 'bytes=0-4095' } }));
    // A download read slowly: the session is renewed while it streams (at most once a second).
    const res = await fetch(t.url);
    assert.equal(res.status, 200);
    const reader = (res.body as ReadableStream<Uint8Array>).getReader();
    try {
      assert.equal((await reader.read()).done, false);
      const started = Date.parse((await listed(t)).expires_at);
      let read = 0;
      const renewed = await waitFor(
        'the session to be renewed by the download in progress',
        async () => {
          const chunk = await reader.read();
          assert.equal(chunk.done, false, 'the download ended before a renewal');
          read += chunk.value?.length ?? 0;
          return Date.parse((await listed(t)).expires_at) > started;
        },
        { intervalMs: 50 },
      );
      assert.ok(renewed && read < 200 * MiB, `renewed after ${read} bytes`);
    } finally {
      await reader.cancel();
    }
  });
});

describe('transfer sessions with a management token', () => {
  let srv: TestServer;
  before(async () => {
    srv = await startServer({ token: 'admin-secret' });
  });
  after(() => srv.close());

  test('the holder of a transfer url never needs the management token', async () => {
    const auth = { authorization: 'Bearer admin-secret' };
    const vdi = (
      await api<{ id: string }>(srv.url, 'POST', '/v1/vdis', { name_label: 'x', virtual_size: MiB }, auth)
    ).body;
    const t = (
      await api<TransferJson>(srv.url, 'POST', '/v1/transfers', { vdi: vdi.id, direction: 'upload' }, auth)
    ).body;
    const data = seededBytes(MiB, 13);
    assert.equal((await putChunk(t.url, data, 0, MiB)).status, 200);
    assert.equal((await fetch(t.url, { method: 'HEAD' })).headers.get('upload-offset'), String(MiB));
    const task = await api<Task>(srv.url, 'POST', `/v1/transfers/${t.id}/finalize?token=${t.token}&wait=30`);
    assert.equal(task.body.status, 'success');
    const denied = await api<ErrorBody>(srv.url, 'GET', `/v1/vdis/${vdi.id}?token=${t.token}`);
    assert.equal(denied.status, 401, 'a transfer token opens nothing else');
  });
});
