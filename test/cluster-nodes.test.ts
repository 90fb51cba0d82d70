/**
 * Two diskport processes over one PostgreSQL database and one data directory:
 * both are listed with their heartbeats, starting the second leaves the
 * first's running work alone, and what one writes the other reads.
 * PostgreSQL only: on SQLite a data directory is one process's
 * (test/data-dir-lock.test.ts).
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { api, createVdi, sha256Url, type TransferJson } from './helpers/api.js';
import { TEST_DATABASE_URL } from './helpers/pg.js';
import { type ServerProcess, seededBytes, spawnServer, tempDir } from './helpers/server.js';

const MiB = 1024 * 1024;
const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');
const skip = TEST_DATABASE_URL ? false : 'several nodes need PostgreSQL (run with scripts/test-postgres.sh)';

type Task = { status: string; error?: { code: string } };

interface NodeJson {
  id: string;
  address: string | null;
  heartbeat_at: string;
  alive: boolean;
  self: boolean;
  pid: number;
}

describe('two nodes over one database and one data directory', { skip }, () => {
  const dirs: string[] = [];
  const servers: ServerProcess[] = [];
  after(async () => {
    for (const s of servers) await s.stop('SIGKILL');
    for (const d of dirs) await fsp.rm(d, { recursive: true, force: true });
  });

  test('the second node lists both, leaves the first its upload and reads what the first commits', async () => {
    const dataDir = await tempDir();
    dirs.push(dataDir);
    const args = ['--heartbeat', '200ms', '--node-timeout', '2s'];
    const a = await spawnServer(dataDir, args);
    servers.push(a);

    const before = seededBytes(4 * MiB, 151);
    const vdi = await createVdi(a.url, 4 * MiB);
    const contents = (base: string) => `${base}/v1/vdis/${vdi.id}/contents?format=raw`;
    assert.equal((await fetch(contents(a.url), { method: 'PUT', body: new Uint8Array(before) })).status, 200);

    // An upload session on A, half sent: a running task and a staging file.
    const data = seededBytes(4 * MiB, 152);
    const opened = await api<TransferJson>(a.url, 'POST', '/v1/transfers', {
      vdi: vdi.id,
      direction: 'upload',
      format: 'raw',
      size: data.length,
    });
    assert.equal(opened.status, 201, JSON.stringify(opened.body));
    const t = opened.body;
    const put = (base: string, start: number, end: number) =>
      fetch(`${base}/v1/transfers/${t.id}/data?token=${t.token}`, {
        method: 'PUT',
        headers: { 'content-range': `bytes ${start}-${end - 1}/${data.length}` },
        body: new Uint8Array(data.subarray(start, end)),
      });
    assert.ok([200, 204].includes((await put(a.url, 0, 2 * MiB)).status));
    const staging = path.join(dataDir, 'srs', 'local', '.staging');
    const staged = await fsp.readdir(staging);
    assert.ok(staged.length > 0, 'the session has its staging file');

    const b = await spawnServer(dataDir, args);
    servers.push(b);

    const nodes = await api<NodeJson[]>(b.url, 'GET', '/v1/nodes');
    assert.equal(nodes.status, 200);
    const alive = nodes.body.filter((n) => n.alive);
    assert.equal(alive.length, 2, JSON.stringify(nodes.body));
    assert.deepEqual(
      alive.map((n) => n.pid).sort(),
      [a.child.pid, b.child.pid].sort(),
      'the two processes are the two live nodes',
    );
    assert.equal(alive.filter((n) => n.self).length, 1);
    assert.equal(alive.find((n) => n.self)?.pid, b.child.pid);
    assert.ok(alive.every((n) => n.address?.startsWith('http://')));
    // Heartbeats move on while both run.
    const first = new Map(alive.map((n) => [n.id, n.heartbeat_at]));
    let moved = false;
    for (let i = 0; i < 100 && !moved; i++) {
      await new Promise((r) => setTimeout(r, 100));
      const now = (await api<NodeJson[]>(a.url, 'GET', '/v1/nodes')).body;
      moved = [...first].every(([id, at]) => (now.find((n) => n.id === id)?.heartbeat_at ?? at) > at);
    }
    assert.ok(moved, 'both nodes keep beating');

    // A's session survived B's start: its task runs, its staging file is there.
    const task = await api<Task>(a.url, 'GET', `/v1/tasks/${t.task_id}`);
    assert.equal(task.body.status, 'running', JSON.stringify(task.body));
    assert.deepEqual((await fsp.readdir(staging)).sort(), staged.sort(), "B's start removed no staging file");

    // Both nodes read the same bytes, before and after A commits.
    assert.equal(await sha256Url(contents(b.url)), sha256(before));
    assert.ok([200, 204].includes((await put(a.url, 2 * MiB, 4 * MiB)).status));
    const done = await api<Task>(a.url, 'POST', `/v1/transfers/${t.id}/finalize?token=${t.token}&wait=30`);
    assert.equal(done.body.status, 'success', JSON.stringify(done.body));
    assert.equal(await sha256Url(contents(a.url)), sha256(data));
    assert.equal(await sha256Url(contents(b.url)), sha256(data), 'B reads what A committed');
    const fromB = await api<{ generation: number }>(b.url, 'GET', `/v1/vdis/${vdi.id}`);
    const fromA = await api<{ generation: number }>(a.url, 'GET', `/v1/vdis/${vdi.id}`);
    assert.deepEqual(fromB.body, fromA.body);

    // A VDI created on B is A's to read too.
    const other = await createVdi(b.url, 2 * MiB);
    const bytes = seededBytes(2 * MiB, 153);
    const otherUrl = (base: string) => `${base}/v1/vdis/${other.id}/contents?format=raw`;
    assert.equal((await fetch(otherUrl(b.url), { method: 'PUT', body: new Uint8Array(bytes) })).status, 200);
    assert.equal(await sha256Url(otherUrl(a.url)), sha256(bytes));

    // A graceful stop says so at once: the other node lists it as not alive.
    await b.stop();
    const left = (await api<NodeJson[]>(a.url, 'GET', '/v1/nodes')).body;
    assert.equal(left.find((n) => n.pid === b.child.pid)?.alive, false);
  });
});
