/**
 * One writer per VDI across nodes: the VDI locks are leases in the shared
 * database, which lapse when their node dies, and a node whose lease lapsed
 * commits nothing (VDI_LEASE_LOST). PostgreSQL only: on SQLite a data
 * directory is one process's.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import { after, describe, test } from 'node:test';
import { api, createVdi, sha256Url, type TransferJson } from './helpers/api.js';
import { execSqlAt, TEST_DATABASE_URL } from './helpers/pg.js';
import { type ServerProcess, seededBytes, spawnServer, tempDir } from './helpers/server.js';
import { waitFor } from './helpers/wait.js';

const MiB = 1024 * 1024;
const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');
const skip = TEST_DATABASE_URL ? false : 'several nodes need PostgreSQL (run with scripts/test-postgres.sh)';
const ARGS = ['--heartbeat', '200ms', '--node-timeout', '2s'];

type Task = { status: string; error?: { code: string } };
type ErrorBody = { error: { code: string; message: string } };

const openUpload = (base: string, vdi: string, size: number) =>
  api<TransferJson | ErrorBody>(base, 'POST', '/v1/transfers', {
    vdi,
    direction: 'upload',
    format: 'raw',
    size,
  });
const putRaw = (base: string, vdi: string, bytes: Buffer) =>
  fetch(`${base}/v1/vdis/${vdi}/contents?format=raw`, { method: 'PUT', body: new Uint8Array(bytes) });
const codeOf = async (res: Response) => ((await res.json()) as ErrorBody).error.code;

describe('one writer per VDI across nodes', { skip }, () => {
  const dirs: string[] = [];
  const servers: ServerProcess[] = [];
  after(async () => {
    for (const s of servers) await s.stop('SIGKILL');
    for (const d of dirs) await fsp.rm(d, { recursive: true, force: true });
  });
  const cluster = async (n: number) => {
    const dataDir = await tempDir();
    dirs.push(dataDir);
    const nodes: ServerProcess[] = [];
    for (let i = 0; i < n; i++) nodes.push(await spawnServer(dataDir, ARGS));
    servers.push(...nodes);
    return { dataDir, nodes };
  };

  test('two nodes racing for one VDI: one writes, the other gets 409 VDI_BUSY', async () => {
    const {
      nodes: [a, b],
    } = await cluster(2);
    for (let round = 0; round < 5; round++) {
      const vdi = await createVdi(a.url, 2 * MiB);
      const [ra, rb] = await Promise.all([
        openUpload(a.url, vdi.id, 2 * MiB),
        openUpload(b.url, vdi.id, 2 * MiB),
      ]);
      const statuses = [ra.status, rb.status].sort();
      assert.deepEqual(statuses, [201, 409], JSON.stringify([ra.body, rb.body]));
      const refused = (ra.status === 409 ? ra : rb).body as ErrorBody;
      assert.equal(refused.error.code, 'VDI_BUSY');
      // While the session is open, no node writes the VDI another way.
      for (const base of [a.url, b.url]) {
        const res = await putRaw(base, vdi.id, seededBytes(2 * MiB, 160 + round));
        assert.equal(res.status, 409);
        assert.equal(await codeOf(res), 'VDI_BUSY');
      }
      const [winner, base] =
        ra.status === 201 ? [ra.body as TransferJson, a.url] : [rb.body as TransferJson, b.url];
      assert.equal(
        (await api(base, 'DELETE', `/v1/transfers/${winner.id}?token=${winner.token}`)).status,
        200,
      );
      // Released: either node may write now.
      const bytes = seededBytes(2 * MiB, 170 + round);
      assert.equal((await putRaw(round % 2 ? a.url : b.url, vdi.id, bytes)).status, 200);
      assert.equal(await sha256Url(`${a.url}/v1/vdis/${vdi.id}/contents?format=raw`), sha256(bytes));
    }
  });

  test('a node killed -9 holding a VDI: another node takes its session (and the VDI) over once its lease lapsed', async () => {
    const {
      nodes: [a, b],
    } = await cluster(2);
    const vdi = await createVdi(a.url, 2 * MiB);
    const opened = await openUpload(a.url, vdi.id, 2 * MiB);
    assert.equal(opened.status, 201);
    const t = opened.body as TransferJson;
    const busy = await putRaw(b.url, vdi.id, seededBytes(2 * MiB, 180));
    assert.equal(busy.status, 409);
    assert.equal(await codeOf(busy), 'VDI_BUSY');
    const nodeB = (await api<{ id: string; self: boolean }[]>(b.url, 'GET', '/v1/nodes')).body.find(
      (n) => n.self,
    )!;
    await a.stop('SIGKILL');
    // Bounded by --node-timeout (2 s) and the heartbeat; on this machine the dead pid says it at once.
    await waitFor(
      "node b to take node a's session over",
      async () =>
        (await api<{ node: string }>(b.url, 'GET', `/v1/tasks/${t.task_id}`)).body.node === nodeB.id,
      { timeoutMs: 20_000 },
    );
    // The session holds the VDI for its client, on its new node: no other write meanwhile.
    const still = await putRaw(b.url, vdi.id, seededBytes(2 * MiB, 182));
    assert.equal(still.status, 409);
    assert.equal(await codeOf(still), 'VDI_BUSY');
    assert.equal((await api(b.url, 'DELETE', `/v1/transfers/${t.id}?token=${t.token}`)).status, 200);
    const bytes = seededBytes(2 * MiB, 181);
    assert.equal((await putRaw(b.url, vdi.id, bytes)).status, 200);
    assert.equal(await sha256Url(`${b.url}/v1/vdis/${vdi.id}/contents?format=raw`), sha256(bytes));
  });

  test('a node whose lease lapsed commits nothing: the finalize fails with VDI_LEASE_LOST', async () => {
    const {
      dataDir,
      nodes: [a, b],
    } = await cluster(2);
    const before = seededBytes(2 * MiB, 190);
    const vdi = await createVdi(a.url, 2 * MiB);
    assert.equal((await putRaw(a.url, vdi.id, before)).status, 200);
    const opened = await openUpload(a.url, vdi.id, 2 * MiB);
    assert.equal(opened.status, 201);
    const t = opened.body as TransferJson;
    const data = seededBytes(2 * MiB, 191);
    const put = await fetch(`${a.url}/v1/transfers/${t.id}/data?token=${t.token}`, {
      method: 'PUT',
      headers: { 'content-range': `bytes 0-${data.length - 1}/${data.length}` },
      body: new Uint8Array(data),
    });
    assert.ok(put.ok, String(put.status));
    // What a partition longer than --node-timeout leaves: A's lease past its expiry, never renewed.
    execSqlAt(
      dataDir,
      `UPDATE leases SET expires_at = '2000-01-01T00:00:00.000Z' WHERE resource = 'vdi:${vdi.id}'`,
    );
    // Another node may take the VDI now.
    const other = await openUpload(b.url, vdi.id, 2 * MiB);
    assert.equal(other.status, 201, JSON.stringify(other.body));
    const done = await api<Task>(a.url, 'POST', `/v1/transfers/${t.id}/finalize?token=${t.token}&wait=30`);
    const task =
      done.body.status === 'failure'
        ? done.body
        : (await api<Task>(a.url, 'GET', `/v1/tasks/${t.task_id}?wait=30`)).body;
    assert.equal(task.status, 'failure', JSON.stringify(done.body));
    assert.equal(task.error?.code, 'VDI_LEASE_LOST');
    for (const base of [a.url, b.url]) {
      assert.equal(await sha256Url(`${base}/v1/vdis/${vdi.id}/contents?format=raw`), sha256(before));
    }
  });

  test('merges run on one node at a time: a merge waits while another node holds the turn', async () => {
    const {
      dataDir,
      nodes: [a, b],
    } = await cluster(2);
    const nodeB = (await api<{ id: string; self: boolean }[]>(b.url, 'GET', '/v1/nodes')).body.find(
      (n) => n.self,
    )!;
    // Node B merges (as far as the cluster knows): its turn, unexpired.
    execSqlAt(
      dataDir,
      `INSERT INTO leases (resource, node_id, holder, epoch, expires_at)
       VALUES ('merges', '${nodeB.id}', 'merges', 1, '2999-01-01T00:00:00.000Z')
       ON CONFLICT (resource) DO UPDATE SET node_id = excluded.node_id, holder = excluded.holder,
         epoch = leases.epoch + 1, expires_at = excluded.expires_at`,
    );
    const first = seededBytes(4 * MiB, 200);
    const second = Buffer.from(first);
    seededBytes(MiB, 201).copy(second, MiB);
    const vdi = await createVdi(a.url, 4 * MiB);
    assert.equal((await putRaw(a.url, vdi.id, first)).status, 200);
    const snap = await api<{ id: string }>(a.url, 'POST', `/v1/vdis/${vdi.id}/snapshots`);
    assert.equal(snap.status, 201);
    assert.equal((await putRaw(a.url, vdi.id, second)).status, 200);
    // Deleting the snapshot plans a merge on A, which finds the turn taken.
    assert.equal((await api(a.url, 'DELETE', `/v1/vdis/${snap.body.id}`)).status, 204);
    const merges = async () =>
      (await api<Task[]>(a.url, 'GET', '/v1/tasks?type=merge')).body.filter((t) => t.status === 'success');
    await new Promise((r) => setTimeout(r, 3000));
    assert.deepEqual(await merges(), [], 'no merge while another node holds the turn');
    execSqlAt(dataDir, `UPDATE leases SET holder = '', expires_at = '' WHERE resource = 'merges'`);
    await waitFor('the merge once the turn is free', async () => (await merges()).length > 0, {
      timeoutMs: 30_000,
    });
    assert.equal(await sha256Url(`${b.url}/v1/vdis/${vdi.id}/contents?format=raw`), sha256(second));
  });
});
