/**
 * Merges of raw chains at rest (docs/design.md, "Merge"): deleting a snapshot
 * merges the layer over it down as a background task, a chain deeper than the
 * limit is flattened at the limit, and through both every VDI and snapshot
 * reads its own bytes: readers holding the old chain (even of the deleted
 * snapshot) included, and imports arriving meanwhile.
 */
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { api, createVdi } from './helpers/api.js';
import { chainChecks, sha256 } from './helpers/chain-checks.js';
import { prng, seededBytes, startServer, type TestServer } from './helpers/server.js';
import { waitFor } from './helpers/wait.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 16 * MiB;
const LIMIT = 4;

type TaskJson = {
  id: string;
  type: string;
  status: string;
  bytes_done: number;
  bytes_total: number | null;
  result: Record<string, unknown> | null;
  error: { code: string; message: string } | null;
};

/** `disk` with `writes` scattered 64 KiB-aligned writes and one zeroed block, from `seed`. */
function scattered(disk: Buffer, seed: number, writes = 6): Buffer {
  const out = Buffer.from(disk);
  const rnd = prng(seed);
  for (let i = 0; i < writes; i++) {
    const at = Math.floor(rnd() * (out.length / (64 * KiB) - 2)) * 64 * KiB;
    seededBytes(64 * KiB + 512, seed * 100 + i).copy(out, at);
  }
  const z = Math.floor(rnd() * (out.length / (64 * KiB))) * 64 * KiB;
  out.fill(0, z, z + 64 * KiB);
  return out;
}

describe('merges of raw chains at rest', () => {
  let server: TestServer;
  let srDir: string;
  const url = () => server.url;

  before(async () => {
    server = await startServer({ config: { maxChainDepth: LIMIT } });
    srDir = path.join(server.dataDir, 'srs', 'local');
  });
  after(async () => {
    await server.close();
    await fsp.rm(server.dataDir, { recursive: true, force: true });
  });

  const { importRaw, snapshot, remove, assertModel } = chainChecks({
    get url() {
      return server.url;
    },
    get dataDir() {
      return server.dataDir;
    },
    get srDir() {
      return srDir;
    },
  });
  const mergeTasks = async () =>
    (await api<TaskJson[]>(url(), 'GET', '/v1/tasks?type=merge&limit=1000')).body;
  /** Layers a VDI reads through (1: a flat file), from the metadata store. */
  const depthOf = (id: string): number => {
    const db = server.services.db;
    const row = db.prepare('SELECT content_id FROM vdis WHERE id = ?').get(id) as { content_id: string };
    let depth = 0;
    for (let at: string | null = row.content_id; at !== null; depth++) {
      const c = db.prepare('SELECT parent FROM contents WHERE id = ?').get(at) as
        | { parent: string | null }
        | undefined;
      at = c?.parent ?? null;
    }
    return depth;
  };
  /** The SR holds exactly the files rows name: VDIs' files, their digests, parents kept under their ids. */
  const assertNoLeftovers = async () => {
    // the server's own store: the same reads on SQLite and on PostgreSQL
    const db = server.services.db;
    {
      const live = new Set<string>();
      for (const r of db.prepare('SELECT file_name, digest_file FROM vdis').all() as {
        file_name: string;
        digest_file: string | null;
      }[]) {
        live.add(r.file_name);
        if (r.digest_file) live.add(r.digest_file);
      }
      for (const r of db.prepare('SELECT DISTINCT parent FROM contents WHERE parent IS NOT NULL').all() as {
        parent: string;
      }[])
        live.add(r.parent);
      const files = (await fsp.readdir(srDir)).filter((n) => /\.g\d+\./.test(n));
      assert.deepEqual(files.sort(), [...live].sort(), 'the SR holds the files rows name, nothing more');
      assert.deepEqual(await fsp.readdir(path.join(srDir, '.staging')), []);
    }
  };

  test('deleting a snapshot merges the layer over it down, as a task; every VDI and snapshot reads as before', async () => {
    const vdi = await createVdi(url(), SIZE, { image_format: 'raw' });
    const base = seededBytes(SIZE, 1);
    base.fill(0, 10 * MiB, 12 * MiB);
    await importRaw(vdi.id, base);
    const s1 = await snapshot(vdi.id);
    const v1 = scattered(base, 2);
    await importRaw(vdi.id, v1);
    const s2 = await snapshot(vdi.id);
    const v2 = scattered(v1, 3);
    await importRaw(vdi.id, v2);
    assert.equal(depthOf(vdi.id), 3);
    const before = (await mergeTasks()).length;

    await remove(s1.id);
    await server.services.merges.idle();
    const model = new Map([
      [vdi.id, v2],
      [s2.id, v1],
    ]);
    await assertModel(model, 'after the merge');
    assert.equal(depthOf(vdi.id), 2, 'the chain is one layer shallower');
    assert.equal(depthOf(s2.id), 1, "the snapshot's content is flat again");
    const tasks = await mergeTasks();
    assert.equal(tasks.length, before + 1);
    const task = tasks[0];
    assert.equal(task.status, 'success', JSON.stringify(task));
    assert.equal(task.result?.kind, 'down');
    assert.equal(task.result?.outcome, 'merged');
    // Its cost is the merged layer's ranges (7 blocks at most), not the disk.
    assert.ok(task.bytes_total !== null && task.bytes_total > 0 && task.bytes_total <= 14 * 64 * KiB);
    assert.equal(task.bytes_done, task.bytes_total);
    await assertNoLeftovers();

    // Changed blocks span the merge: the digests describe whole disks.
    const cb = await api<{ bitmap: string }>(url(), 'GET', `/v1/vdis/${vdi.id}/changed-blocks?base=${s2.id}`);
    assert.equal(cb.status, 200);

    await remove(s2.id);
    await server.services.merges.idle();
    await assertModel(new Map([[vdi.id, v2]]), 'after the second merge');
    assert.equal(depthOf(vdi.id), 1);
    await assertNoLeftovers();
    await remove(vdi.id);
    await assertNoLeftovers();
  });

  test('a reader of the deleted snapshot keeps its bytes: the merge waits for it, then runs', async () => {
    const vdi = await createVdi(url(), SIZE, { image_format: 'raw' });
    const base = seededBytes(SIZE, 11);
    await importRaw(vdi.id, base);
    const s1 = await snapshot(vdi.id);
    const v1 = scattered(base, 12, 40);
    await importRaw(vdi.id, v1);
    const before = (await mergeTasks()).length;

    // A slow export of the snapshot, paused after its first bytes.
    const chunks: Buffer[] = [];
    const res = await new Promise<http.IncomingMessage>((resolve, reject) =>
      http.get(`${url()}/v1/vdis/${s1.id}/contents`, resolve).on('error', reject),
    );
    assert.equal(res.statusCode, 200);
    const first: Buffer = await new Promise((resolve) => res.once('data', resolve));
    chunks.push(first);
    res.pause();

    await remove(s1.id);
    const waiting = await waitFor('the merge task', async () => (await mergeTasks()).length > before);
    assert.ok(waiting);
    // While the export holds the snapshot's content alone, nothing is written into it.
    const running = (await mergeTasks())[0];
    assert.equal(running.status, 'running');
    assert.equal(running.bytes_done, 0, 'the merge waits for the reader');

    res.resume();
    for await (const c of res) chunks.push(c as Buffer);
    assert.equal(sha256(Buffer.concat(chunks)), sha256(base), 'the export read the snapshot as it was');
    await waitFor('the merge', async () => (await mergeTasks())[0].status === 'success');
    await server.services.merges.idle();
    await assertModel(new Map([[vdi.id, v1]]), 'after the merge');
    assert.equal(depthOf(vdi.id), 1);
    await remove(vdi.id);
    await assertNoLeftovers();
  });

  test(`a chain deeper than the limit (${LIMIT}) is flattened at the limit; every snapshot reads as before`, async () => {
    const vdi = await createVdi(url(), SIZE, { image_format: 'raw' });
    let live = seededBytes(SIZE, 21);
    await importRaw(vdi.id, live);
    const model = new Map<string, Buffer>([[vdi.id, live]]);
    for (let round = 0; round < LIMIT + 3; round++) {
      const snap = await snapshot(vdi.id);
      model.set(snap.id, live);
      live = scattered(live, 30 + round);
      await importRaw(vdi.id, live);
      model.set(vdi.id, live);
      await server.services.merges.idle();
      for (const id of model.keys())
        assert.ok(depthOf(id) <= LIMIT, `round ${round}: ${id} is ${depthOf(id)} deep`);
    }
    await assertModel(model, 'after flattening');
    const flattened = (await mergeTasks()).filter((t) => t.result?.kind === 'flatten');
    assert.ok(flattened.length >= 3, 'flattened at every round past the limit');
    assert.ok(flattened.every((t) => t.status === 'success' && t.bytes_done === t.bytes_total));
    await assertNoLeftovers();

    // Deleting the snapshots in any order merges what is left; the VDI reads on.
    const rnd = prng(5);
    const snaps = [...model.keys()].filter((id) => id !== vdi.id).sort(() => rnd() - 0.5);
    for (const id of snaps) {
      await remove(id);
      model.delete(id);
      await server.services.merges.idle();
      await assertModel(model, `after deleting ${id}`);
      await assertNoLeftovers();
    }
    assert.equal(depthOf(vdi.id), 1);
    await remove(vdi.id);
  });

  test('imports arriving during merges make them give way and run again; every VDI and snapshot reads its own', async () => {
    const vdi = await createVdi(url(), SIZE, { image_format: 'raw' });
    let live = seededBytes(SIZE, 41);
    await importRaw(vdi.id, live);
    const model = new Map<string, Buffer>([[vdi.id, live]]);
    const snaps: string[] = [];
    for (let round = 0; round < 6; round++) {
      const snap = await snapshot(vdi.id);
      snaps.push(snap.id);
      model.set(snap.id, live);
      live = scattered(live, 50 + round, 60);
      await importRaw(vdi.id, live);
      model.set(vdi.id, live);
      if (round >= 2) {
        // The oldest goes; the import right after it meets the merge.
        const oldest = snaps.shift() as string;
        await remove(oldest);
        model.delete(oldest);
        live = scattered(live, 70 + round, 60);
        await importRaw(vdi.id, live);
        model.set(vdi.id, live);
        await assertModel(model, `round ${round}, merges running`);
      }
    }
    await server.services.merges.idle();
    await assertModel(model, 'after every merge');
    const tasks = await mergeTasks();
    assert.ok(
      tasks.every((t) => t.status === 'success' || t.error?.message.includes('gave way')),
      JSON.stringify(tasks.filter((t) => t.status !== 'success')),
    );
    await assertNoLeftovers();
  });

  test('a merge cancelled by request stops, leaves every disk as it was, and runs again at the next start', async () => {
    const vdi = await createVdi(url(), SIZE, { image_format: 'raw' });
    const base = seededBytes(SIZE, 61);
    await importRaw(vdi.id, base);
    const s1 = await snapshot(vdi.id);
    const v1 = scattered(base, 62, 30);
    await importRaw(vdi.id, v1);
    const before = (await mergeTasks()).length;
    // A reader of the snapshot holds the merge in its wait, where the cancel finds it.
    const res = await new Promise<http.IncomingMessage>((resolve, reject) =>
      http.get(`${url()}/v1/vdis/${s1.id}/contents`, resolve).on('error', reject),
    );
    await new Promise((resolve) => res.once('data', resolve));
    res.pause();
    await remove(s1.id);
    await waitFor('the merge task', async () => (await mergeTasks()).length > before);
    const task = (await mergeTasks())[0];
    assert.equal((await api(url(), 'POST', `/v1/tasks/${task.id}/cancel`)).status, 202);
    const cancelled = await waitFor('the cancel', async () => {
      const t = (await api<TaskJson>(url(), 'GET', `/v1/tasks/${task.id}`)).body;
      return t.status === 'cancelled' ? t : null;
    });
    assert.equal(cancelled.error?.code, 'TASK_CANCELLED');
    res.destroy();
    await server.services.merges.idle();
    assert.equal(depthOf(vdi.id), 2, 'not merged: not tried again in this process');
    assert.equal((await mergeTasks()).length, before + 1);
    await assertModel(new Map([[vdi.id, v1]]), 'after the cancel');

    // The next start plans it again.
    const dataDir = server.dataDir;
    await server.close();
    server = await startServer({ dataDir, config: { maxChainDepth: LIMIT } });
    await server.services.merges.idle();
    assert.equal((await mergeTasks())[0].status, 'success');
    assert.equal(depthOf(vdi.id), 1);
    await assertModel(new Map([[vdi.id, v1]]), 'after the merge at the next start');
    await remove(vdi.id);
    await assertNoLeftovers();
  });
});
