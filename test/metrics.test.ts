import assert from 'node:assert/strict';
import http from 'node:http';
import { after, before, describe, test } from 'node:test';
import { api, createVdi } from './helpers/api.js';
import { sample, scrape } from './helpers/metrics.js';
import { seededBytes, startServer, type TestServer } from './helpers/server.js';

const MiB = 1024 * 1024;
type Timed = { started_at: string; finished_at: string };

describe('GET /metrics', () => {
  let srv: TestServer;
  before(async () => {
    srv = await startServer();
  });
  after(() => srv.close());

  test('starts with zeroed byte counters for every format and no active transfer', async () => {
    const text = await scrape(srv.url);
    for (const format of ['raw', 'vhd', 'qcow2']) {
      assert.equal(sample(text, 'diskport_bytes_received_total', { format }), 0);
      assert.equal(sample(text, 'diskport_bytes_sent_total', { format }), 0);
    }
    assert.equal(sample(text, 'diskport_active_transfers'), 0);
    assert.ok(sample(text, 'process_resident_memory_bytes'), 'default process metrics are there too');
  });

  test('an import and an export raise the byte counters, task counts and durations', async () => {
    const before = await scrape(srv.url);
    const vdi = await createVdi(srv.url, 8 * MiB);
    const body = seededBytes(8 * MiB, 5);
    const put = await fetch(`${srv.url}/v1/vdis/${vdi.id}/contents?format=raw`, {
      method: 'PUT',
      body: new Uint8Array(body),
    });
    const imported = (await put.json()) as Timed;
    assert.equal(put.status, 200, JSON.stringify(imported));
    const exported = await fetch(`${srv.url}/v1/vdis/${vdi.id}/contents?format=raw`);
    assert.equal(exported.status, 200);
    assert.ok(Buffer.from(await exported.arrayBuffer()).equals(body));
    const exportTask = await api<Timed>(srv.url, 'GET', `/v1/tasks/${exported.headers.get('x-task-id')}`);

    const text = await scrape(srv.url);
    const delta = (name: string, labels: Record<string, string>) =>
      (sample(text, name, labels) ?? 0) - (sample(before, name, labels) ?? 0);
    assert.equal(delta('diskport_bytes_received_total', { format: 'raw' }), 8 * MiB);
    assert.equal(delta('diskport_bytes_sent_total', { format: 'raw' }), 8 * MiB);
    assert.equal(delta('diskport_tasks_total', { type: 'import', status: 'success' }), 1);
    assert.equal(delta('diskport_tasks_total', { type: 'export', status: 'success' }), 1);
    assert.equal(delta('diskport_task_duration_seconds_count', { type: 'import' }), 1);
    assert.equal(delta('diskport_task_duration_seconds_count', { type: 'export' }), 1);
    // Each duration is its task's own, from started_at to finished_at (ms in the records).
    for (const [type, task] of [
      ['import', imported],
      ['export', exportTask.body],
    ] as const) {
      const seconds = (Date.parse(task.finished_at) - Date.parse(task.started_at)) / 1000;
      assert.ok(seconds > 0, `${type} took ${seconds} s`);
      const sum = delta('diskport_task_duration_seconds_sum', { type });
      assert.ok(
        Math.abs(sum - seconds) < 1e-6,
        `${type}: ${sum} s in the histogram, ${seconds} s in the task`,
      );
    }
    assert.equal(sample(text, 'diskport_active_transfers'), 0);
  });

  test('an import that fails counts as a failure', async () => {
    const failures = (text: string) =>
      sample(text, 'diskport_tasks_total', { type: 'import', status: 'failure' }) ?? 0;
    const before = failures(await scrape(srv.url));
    const vdi = await createVdi(srv.url, 4 * MiB);
    const res = await fetch(`${srv.url}/v1/vdis/${vdi.id}/contents?format=vhd`, {
      method: 'PUT',
      body: new Uint8Array(seededBytes(MiB, 6)),
    });
    assert.equal(res.status, 400, 'random bytes are not a VHD');
    assert.equal(((await res.json()) as { error: { code: string } }).error.code, 'MALFORMED_IMAGE');
    assert.equal(failures(await scrape(srv.url)), before + 1);
  });

  test('an upload in progress is an active transfer, shows its progress, and its bytes count as they arrive, once', async () => {
    const before = await scrape(srv.url);
    const received = (text: string) =>
      (sample(text, 'diskport_bytes_received_total', { format: 'raw' }) ?? 0) -
      (sample(before, 'diskport_bytes_received_total', { format: 'raw' }) ?? 0);
    const vdi = await createVdi(srv.url, 8 * MiB);
    const { port } = new URL(srv.url);
    const req = http.request({
      host: '127.0.0.1',
      port,
      method: 'PUT',
      path: `/v1/vdis/${vdi.id}/contents?format=raw`,
      headers: { 'content-length': String(8 * MiB) },
    });
    const response = new Promise<number>((resolve, reject) => {
      req.on('response', (r) => {
        r.resume();
        r.on('end', () => resolve(r.statusCode ?? 0));
      });
      req.on('error', reject);
    });
    req.write(seededBytes(3 * MiB, 7));
    let running: { id: string; bytes_done: number }[] = [];
    for (let i = 0; i < 100 && !(running[0]?.bytes_done >= 3 * MiB); i++) {
      running = (await api<typeof running>(srv.url, 'GET', `/v1/tasks?status=running&vdi=${vdi.id}`)).body;
      await new Promise((r) => setTimeout(r, 50));
    }
    assert.equal(running.length, 1, 'the import task is running');
    assert.equal(running[0].bytes_done, 3 * MiB, 'the task shows the bytes that arrived, while it runs');
    const during = await scrape(srv.url);
    assert.equal(sample(during, 'diskport_active_transfers'), 1);
    assert.equal(received(during), 3 * MiB, 'the byte counter moves while the upload runs');
    req.end(seededBytes(5 * MiB, 8));
    assert.equal(await response, 200);
    const after = await scrape(srv.url);
    assert.equal(sample(after, 'diskport_active_transfers'), 0);
    assert.equal(received(after), 8 * MiB, 'every byte counted once');
  });

  test('zeros declared instead of sent are progress, not bytes received', async () => {
    const before = await scrape(srv.url);
    const vdi = await createVdi(srv.url, 8 * MiB);
    const opened = await api<{ id: string; url: string; token: string }>(srv.url, 'POST', '/v1/transfers', {
      vdi: vdi.id,
      direction: 'upload',
      format: 'raw',
      size: 8 * MiB,
    });
    const t = opened.body;
    const put = await fetch(t.url, {
      method: 'PUT',
      headers: { 'content-range': `bytes 0-${3 * MiB - 1}/${8 * MiB}` },
      body: new Uint8Array(seededBytes(3 * MiB, 12)),
    });
    assert.equal(put.status, 200, await put.text());
    const zero = await fetch(t.url, {
      method: 'PATCH',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ op: 'zero', offset: 3 * MiB, size: 5 * MiB }),
    });
    assert.equal(zero.status, 200, await zero.text());
    const fin = await api<{ status: string; bytes_done: number }>(
      srv.url,
      'POST',
      `/v1/transfers/${t.id}/finalize?token=${t.token}&wait=30`,
    );
    assert.equal(fin.body.status, 'success');
    assert.equal(fin.body.bytes_done, 8 * MiB, 'the task counts the zeros as done');
    const text = await scrape(srv.url);
    const received =
      (sample(text, 'diskport_bytes_received_total', { format: 'raw' }) ?? 0) -
      (sample(before, 'diskport_bytes_received_total', { format: 'raw' }) ?? 0);
    assert.equal(received, 3 * MiB, 'only the bytes that crossed the wire');
  });

  test('an export in progress counts the bytes it has sent', async () => {
    const before = await scrape(srv.url);
    const vdi = await createVdi(srv.url, 256 * MiB);
    const { port } = new URL(srv.url);
    // A client that stops reading: the export waits on the socket, mid-disk.
    const res = await new Promise<http.IncomingMessage>((resolve, reject) =>
      http
        .get({ host: '127.0.0.1', port, path: `/v1/vdis/${vdi.id}/contents?format=raw` }, resolve)
        .on('error', reject),
    );
    res.pause();
    try {
      let sent = 0;
      for (let i = 0; i < 100 && sent === 0; i++) {
        await new Promise((r) => setTimeout(r, 50));
        const text = await scrape(srv.url);
        sent =
          (sample(text, 'diskport_bytes_sent_total', { format: 'raw' }) ?? 0) -
          (sample(before, 'diskport_bytes_sent_total', { format: 'raw' }) ?? 0);
      }
      assert.ok(sent > 0 && sent < 256 * MiB, `${sent} bytes counted while the export waits`);
    } finally {
      res.destroy();
    }
  });

  test('checksum tasks are counted by type', async () => {
    const vdi = await createVdi(srv.url, MiB);
    const started = await api<{ id: string }>(srv.url, 'GET', `/v1/vdis/${vdi.id}/checksum?async=true`);
    assert.equal(started.status, 202);
    await api(srv.url, 'GET', `/v1/tasks/${started.body.id}?wait=30`);
    const text = await scrape(srv.url);
    assert.equal(sample(text, 'diskport_tasks_total', { type: 'checksum', status: 'success' }), 1);
  });
});

describe('GET /metrics with a token', () => {
  let srv: TestServer;
  before(async () => {
    srv = await startServer({ token: 'm3trics' });
  });
  after(() => srv.close());

  test('needs the bearer token like the /v1 API', async () => {
    assert.equal((await fetch(`${srv.url}/metrics`)).status, 401);
    assert.equal(
      (await fetch(`${srv.url}/metrics`, { headers: { authorization: 'Bearer no' } })).status,
      403,
    );
    const text = await scrape(srv.url, { authorization: 'Bearer m3trics' });
    assert.equal(sample(text, 'diskport_active_transfers'), 0);
  });
});
