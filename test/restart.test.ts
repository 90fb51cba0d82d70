import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { api, createVdi, sha256Url } from './helpers/api.js';
import { sample, scrape } from './helpers/metrics.js';
import { seededBytes, spawnServer, tempDir } from './helpers/server.js';

const MiB = 1024 * 1024;
type Task = { id: string; status: string; error: { code: string } | null };

describe('the service survives restarts and kill -9', () => {
  const dirs: string[] = [];
  after(async () => {
    for (const d of dirs) await fsp.rm(d, { recursive: true, force: true });
  });

  test('VDIs, their contents and the task history are all there after a restart', async () => {
    const dataDir = await tempDir();
    dirs.push(dataDir);
    const data = seededBytes(4 * MiB, 21);
    const first = await spawnServer(dataDir);
    let vdiId: string;
    let taskId: string;
    try {
      vdiId = (await createVdi(first.url, 8 * MiB, { name_label: 'survivor' })).id;
      const put = await fetch(`${first.url}/v1/vdis/${vdiId}/contents?format=raw`, {
        method: 'PUT',
        body: new Uint8Array(data),
      });
      assert.equal(put.status, 200);
      taskId = ((await put.json()) as Task).id;
    } finally {
      await first.stop();
    }

    const second = await spawnServer(dataDir);
    try {
      const vdi = await api<{ name_label: string }>(second.url, 'GET', `/v1/vdis/${vdiId}`);
      assert.equal(vdi.body.name_label, 'survivor');
      const expected = createHash('sha256')
        .update(Buffer.concat([data, Buffer.alloc(4 * MiB)]))
        .digest('hex');
      assert.equal(await sha256Url(`${second.url}/v1/vdis/${vdiId}/contents`), expected);
      const task = await api<Task>(second.url, 'GET', `/v1/tasks/${taskId}`);
      assert.equal(task.body.status, 'success');
    } finally {
      await second.stop();
    }
  });

  test('a session resumed after a restart counts in the byte metrics only what arrives after it', async () => {
    const dataDir = await tempDir();
    dirs.push(dataDir);
    const data = seededBytes(8 * MiB, 22);
    const putRange = (url: string, start: number, end: number) =>
      fetch(url, {
        method: 'PUT',
        headers: { 'content-range': `bytes ${start}-${end - 1}/${data.length}` },
        body: new Uint8Array(data.subarray(start, end)),
      });
    const first = await spawnServer(dataDir);
    let t: { id: string; token: string; data_path: string };
    try {
      const vdi = await createVdi(first.url, data.length);
      t = (
        await api<typeof t>(first.url, 'POST', '/v1/transfers', {
          vdi: vdi.id,
          direction: 'upload',
          format: 'raw',
          size: data.length,
        })
      ).body;
      assert.equal((await putRange(`${first.url}${t.data_path}?token=${t.token}`, 0, 3 * MiB)).status, 200);
    } finally {
      await first.stop();
    }
    const second = await spawnServer(dataDir);
    try {
      const url = `${second.url}${t.data_path}?token=${t.token}`;
      assert.equal((await putRange(url, 3 * MiB, data.length)).status, 200);
      const fin = await api<Task>(
        second.url,
        'POST',
        `/v1/transfers/${t.id}/finalize?token=${t.token}&wait=30`,
      );
      assert.equal(fin.body.status, 'success');
      const text = await scrape(second.url);
      assert.equal(sample(text, 'diskport_bytes_received_total', { format: 'raw' }), 5 * MiB);
    } finally {
      await second.stop();
    }
  });

  test('after kill -9 mid-import the task is INTERRUPTED, staging is cleaned and the VDI is as before', async () => {
    const dataDir = await tempDir();
    dirs.push(dataDir);
    const before = seededBytes(2 * MiB, 31);
    const server = await spawnServer(dataDir);
    const vdiId = (await createVdi(server.url, 16 * MiB)).id;
    const url = `${server.url}/v1/vdis/${vdiId}/contents?format=raw`;
    assert.equal((await fetch(url, { method: 'PUT', body: new Uint8Array(before) })).status, 200);
    const beforeSha = await sha256Url(url);

    const req = http.request(url, { method: 'PUT', headers: { 'content-length': String(16 * MiB) } });
    req.on('error', () => {}); // the server is about to die under it
    req.write(seededBytes(6 * MiB, 32));
    let running: Task | undefined;
    for (let i = 0; i < 100 && !running; i++) {
      running = (await api<Task[]>(server.url, 'GET', `/v1/tasks?vdi=${vdiId}&status=running`)).body[0];
      if (!running) await sleep(50);
    }
    assert.ok(running, 'the import is running');
    await server.stop('SIGKILL');
    req.destroy();
    const staging = path.join(dataDir, 'srs', 'local', '.staging');
    assert.ok((await fsp.readdir(staging)).length > 0, 'the killed import left its staging file');

    const restarted = await spawnServer(dataDir);
    try {
      const task = await api<Task>(restarted.url, 'GET', `/v1/tasks/${running.id}`);
      assert.equal(task.body.status, 'failure');
      assert.equal(task.body.error?.code, 'INTERRUPTED');
      assert.deepEqual(await fsp.readdir(staging), [], 'staging files of interrupted tasks are removed');
      assert.equal(await sha256Url(`${restarted.url}/v1/vdis/${vdiId}/contents?format=raw`), beforeSha);
    } finally {
      await restarted.stop();
    }
  });

  test('listening beyond loopback without a token is refused with a hint', async () => {
    const dataDir = await tempDir();
    dirs.push(dataDir);
    await assert.rejects(spawnServer(dataDir, ['--host', '0.0.0.0']), /DISKPORT_TOKEN/);
  });
});
