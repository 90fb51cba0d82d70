import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { api, createVdi, execFileP, sha256Url } from './helpers/api.js';
import { seededBytes, startServer, type TestServer } from './helpers/server.js';

const MiB = 1024 * 1024;
type Task = {
  id: string;
  status: string;
  type: string;
  error: { code: string; message: string } | null;
  bytes_done: number;
};
type ErrorBody = { error: { code: string; message: string; details?: Record<string, unknown> } };

describe('a failed, cancelled or refused import leaves the VDI as it was', () => {
  let srv: TestServer;
  let vdiId: string;
  let original: Buffer;
  let originalSha: string;

  const contentsUrl = () => `${srv.url}/v1/vdis/${vdiId}/contents?format=raw`;
  const assertUnchanged = async () => {
    assert.equal(await sha256Url(contentsUrl()), originalSha, 'the VDI keeps its previous bytes');
    const staging = path.join(srv.dataDir, 'srs', 'local', '.staging');
    assert.deepEqual(await fsp.readdir(staging), [], 'no staging file is left behind');
  };
  const waitForTask = async (status: string) => {
    for (let i = 0; i < 100; i++) {
      const list = await api<Task[]>(srv.url, 'GET', `/v1/tasks?vdi=${vdiId}&type=import&status=${status}`);
      const t = list.body.find((x) => x.type === 'import');
      if (t) return t;
      await sleep(50);
    }
    throw new Error(`no ${status} import task for ${vdiId}`);
  };

  before(async () => {
    srv = await startServer();
    vdiId = (await createVdi(srv.url, 8 * MiB)).id;
    original = seededBytes(8 * MiB, 11);
    originalSha = createHash('sha256').update(original).digest('hex');
    const put = await fetch(contentsUrl(), { method: 'PUT', body: new Uint8Array(original) });
    assert.equal(put.status, 200);
  });
  after(() => srv.close());

  test('a Content-Length larger than the VDI is refused at once with 413', async () => {
    const res = await fetch(contentsUrl(), { method: 'PUT', body: new Uint8Array(8 * MiB + 512).fill(1) });
    assert.equal(res.status, 413);
    const body = (await res.json()) as ErrorBody;
    assert.equal(body.error.code, 'TOO_LARGE');
    assert.match(body.error.message, /larger than the VDI/);
    await assertUnchanged();
  });

  test('curl (Expect: 100-continue) gets the 413 before sending its body, as JSON', async () => {
    const big = path.join(srv.dataDir, 'too-big.img');
    await fsp.writeFile(big, Buffer.alloc(32 * MiB, 7));
    const { stdout } = await execFileP('curl', [
      '-sS',
      '-T',
      big,
      '-w',
      '\n%{http_code} %{size_upload}',
      contentsUrl(),
    ]);
    await fsp.rm(big);
    const [json, tail] = stdout.split('\n');
    const [status, uploaded] = tail.split(' ').map(Number);
    assert.equal(status, 413);
    assert.equal((JSON.parse(json) as ErrorBody).error.code, 'TOO_LARGE');
    assert.ok(uploaded < MiB, `curl sent ${uploaded} bytes of a body that was refused up front`);
    await assertUnchanged();
  });

  test('a chunked upload that runs past the VDI is cut with 413', async () => {
    const body = new ReadableStream<Uint8Array>({
      start(c) {
        for (let i = 0; i < 9; i++) c.enqueue(seededBytes(MiB, 50 + i));
        c.close();
      },
    });
    const res = await fetch(contentsUrl(), { method: 'PUT', body, duplex: 'half' } as RequestInit);
    assert.equal(res.status, 413);
    assert.equal(((await res.json()) as ErrorBody).error.code, 'TOO_LARGE');
    await assertUnchanged();
  });

  test('a client that disconnects mid-upload changes nothing; the task records why', async () => {
    const { port } = new URL(srv.url);
    const socket = net.connect(Number(port), '127.0.0.1');
    await new Promise((r) => socket.once('connect', r));
    socket.write(
      `PUT /v1/vdis/${vdiId}/contents?format=raw HTTP/1.1\r\nHost: x\r\nContent-Length: ${8 * MiB}\r\n\r\n`,
    );
    socket.write(seededBytes(3 * MiB, 99));
    const running = await waitForTask('running');
    socket.destroy();
    const failed = (await api<Task>(srv.url, 'GET', `/v1/tasks/${running.id}?wait=5`)).body;
    assert.equal(failed.status, 'failure');
    assert.equal(failed.error?.code, 'CLIENT_DISCONNECTED');
    await assertUnchanged();
  });

  test('cancelling a running import answers the upload with TASK_CANCELLED and changes nothing', async () => {
    let stop = false;
    const req = http.request(contentsUrl(), {
      method: 'PUT',
      headers: { 'content-length': String(8 * MiB) },
    });
    const response = new Promise<{ status: number; body: ErrorBody }>((resolve, reject) => {
      req.on('response', async (res) => {
        let text = '';
        for await (const c of res) text += c;
        resolve({ status: res.statusCode!, body: JSON.parse(text) });
      });
      req.on('error', reject);
    });
    (async () => {
      for (let i = 0; i < 7 && !stop; i++) {
        req.write(seededBytes(MiB, 200 + i));
        await sleep(30);
      }
    })();
    const running = await waitForTask('running');
    const busy = await fetch(contentsUrl(), { method: 'PUT', body: new Uint8Array(512) });
    assert.equal(busy.status, 409, 'one writer per VDI');
    assert.equal(((await busy.json()) as ErrorBody).error.code, 'VDI_BUSY');

    const polled = await api<Task>(srv.url, 'GET', `/v1/tasks/${running.id}?wait=0.2`);
    assert.equal(polled.body.status, 'running', 'wait returns the live task when time is up');
    const cancel = await api<Task>(srv.url, 'POST', `/v1/tasks/${running.id}/cancel`);
    assert.equal(cancel.status, 202);
    const res = await response;
    stop = true;
    assert.equal(res.status, 409);
    assert.equal(res.body.error.code, 'TASK_CANCELLED');
    const done = await api<Task>(srv.url, 'GET', `/v1/tasks/${running.id}?wait=5`);
    assert.equal(done.body.status, 'cancelled');
    const again = await api<ErrorBody>(srv.url, 'POST', `/v1/tasks/${running.id}/cancel`);
    assert.equal(again.status, 409);
    assert.equal(again.body.error.code, 'TASK_FINISHED');
    await assertUnchanged();
  });

  test('bad task queries are refused with the allowed values', async () => {
    const badStatus = await api<ErrorBody>(srv.url, 'GET', '/v1/tasks?status=done');
    assert.equal(badStatus.status, 400);
    assert.match(badStatus.body.error.message, /pending, running, success, failure, cancelled/);
    const anyTask = (await api<Task[]>(srv.url, 'GET', '/v1/tasks')).body[0];
    const badWait = await api<ErrorBody>(srv.url, 'GET', `/v1/tasks/${anyTask.id}?wait=forever`);
    assert.equal(badWait.status, 400);
    assert.match(badWait.body.error.message, /wait must be/);
  });

  test('a bad Content-Length or unknown format is refused before anything is written', async () => {
    const unknown = await fetch(`${srv.url}/v1/vdis/${vdiId}/contents?format=vmdk`, {
      method: 'PUT',
      body: 'x',
    });
    assert.equal(unknown.status, 400);
    assert.equal(((await unknown.json()) as ErrorBody).error.code, 'FORMAT_NOT_SUPPORTED');
    const missing = await fetch(`${srv.url}/v1/vdis/not-a-vdi/contents`, { method: 'PUT', body: 'x' });
    assert.equal(missing.status, 404);
    await assertUnchanged();
  });
});
