/**
 * Chains at rest in a qcow2 SR (docs/design.md, "Layer files per SR
 * format"): after a snapshot, an import costs the clusters it changes, in a
 * real qcow2 overlay naming its parent's file as backing file, so qemu-img
 * reads each VDI's top file as its whole disk. qemu-img is the judge: `check`
 * and `compare` (against the expected disk) of every VDI's and snapshot's
 * file after every step of a seeded history of imports, snapshots, clones,
 * deletes and merges (down merges and flattenings past a depth limit).
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import Database from 'better-sqlite3';
import { api, createVdi, sha256Url } from './helpers/api.js';
import { prng, type ServerProcess, seededBytes, spawnServer, tempDir } from './helpers/server.js';
import { waitFor } from './helpers/wait.js';

const execFileP = promisify(execFile);
const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 32 * MiB;
const BLOCK = 64 * KiB;
const DATA = 24 * MiB;
const DEPTH = 3;

type VdiJson = { id: string; generation: number; virtual_size: number; is_snapshot: boolean };
type TaskJson = { status: string };

const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** `disk` with `blocks` seeded 64 KiB blocks rewritten: most with new data, some with zeros, some as they were. */
function changed(disk: Buffer, seed: number, blocks: number): Buffer {
  const out = Buffer.from(disk);
  const rnd = prng(seed);
  const fresh = seededBytes(blocks * BLOCK, seed);
  for (let i = 0; i < blocks; i++) {
    const at = Math.floor(rnd() * (out.length / BLOCK)) * BLOCK;
    const r = rnd();
    if (r < 0.15) out.fill(0, at, at + BLOCK);
    else if (r < 0.9) fresh.copy(out, at, i * BLOCK, (i + 1) * BLOCK);
  }
  return out;
}

describe('chains at rest (qcow2 SR)', () => {
  let dataDir: string;
  let srDir: string;
  let work: string;
  let server: ServerProcess;
  const args = ['--max-chain-depth', String(DEPTH)];

  before(async () => {
    dataDir = await tempDir();
    work = await tempDir();
    srDir = path.join(dataDir, 'srs', 'local');
    server = await spawnServer(dataDir, args);
  });
  after(async () => {
    await server.stop();
    await fsp.rm(dataDir, { recursive: true, force: true });
    await fsp.rm(work, { recursive: true, force: true });
  });

  const url = () => server.url;
  const importRaw = async (id: string, body: Buffer) => {
    const res = await fetch(`${url()}/v1/vdis/${id}/contents?format=raw`, {
      method: 'PUT',
      body: new Uint8Array(body),
    });
    assert.equal(res.status, 200, await res.text());
  };
  const snapshot = async (id: string) => {
    const res = await api<VdiJson>(url(), 'POST', `/v1/vdis/${id}/snapshots`);
    assert.equal(res.status, 201, JSON.stringify(res.body));
    return res.body;
  };
  const remove = async (id: string) => {
    assert.equal((await fetch(`${url()}/v1/vdis/${id}`, { method: 'DELETE' })).status, 204);
  };
  const readDb = <T>(fn: (db: Database.Database) => T): T => {
    const db = new Database(path.join(dataDir, 'diskport.sqlite'), { readonly: true });
    try {
      return fn(db);
    } finally {
      db.close();
    }
  };
  const fileOf = (id: string) =>
    path.join(
      srDir,
      readDb(
        (db) =>
          (db.prepare('SELECT file_name FROM vdis WHERE id = ?').get(id) as { file_name: string }).file_name,
      ),
    );
  /** Bytes allocated in the SR directory, each inode once. */
  const srBytes = async () => {
    const seen = new Set<number>();
    let n = 0;
    for (const name of await fsp.readdir(srDir)) {
      // A commit unlinks the file it replaced after it answers.
      const st = await fsp.stat(path.join(srDir, name)).catch(() => null);
      if (!st?.isFile() || seen.has(st.ino)) continue;
      seen.add(st.ino);
      n += st.blocks * 512;
    }
    return n;
  };
  const mergesDone = () =>
    waitFor(
      'the merges to be done',
      async () => {
        const tasks = (await api<TaskJson[]>(url(), 'GET', '/v1/tasks?type=merge&limit=1000')).body;
        if (tasks.some((t) => t.status === 'running' || t.status === 'pending')) return false;
        return readDb((db) => {
          const orphans = db
            .prepare(
              `SELECT COUNT(*) AS n FROM contents c WHERE NOT EXISTS (SELECT 1 FROM vdis v WHERE v.content_id = c.id)
               AND (SELECT COUNT(*) FROM contents k WHERE k.parent = c.id) = 1`,
            )
            .get() as { n: number };
          return orphans.n === 0;
        });
      },
      { timeoutMs: 120_000, intervalMs: 50 },
    );
  /** qemu-img's view of a VDI's file: a clean image whose chain reads as `want`. Returns the chain's depth. */
  const assertQemu = async (id: string, want: Buffer, what: string): Promise<number> => {
    const file = fileOf(id);
    try {
      await execFileP('qemu-img', ['check', '-q', '-f', 'qcow2', file]);
    } catch (err) {
      const e = err as { stdout?: string; stderr?: string };
      assert.fail(`${what}: qemu-img check of ${path.basename(file)}: ${e.stdout}${e.stderr}`);
    }
    const expected = path.join(work, 'expected.raw');
    await fsp.writeFile(expected, want);
    try {
      await execFileP('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'raw', file, expected]);
    } catch (err) {
      const e = err as { stdout?: string; stderr?: string };
      assert.fail(`${what}: qemu-img compare of ${path.basename(file)}: ${e.stdout}${e.stderr}`);
    }
    const { stdout } = await execFileP('qemu-img', [
      'info',
      '--backing-chain',
      '--output=json',
      '-f',
      'qcow2',
      file,
    ]);
    const chain = JSON.parse(stdout) as { format: string; 'backing-filename'?: string }[];
    for (const layer of chain) assert.equal(layer.format, 'qcow2', `${what}: every layer is qcow2`);
    return chain.length;
  };
  /** diskport's view: raw and qcow2 exports, a range, and the checksum. */
  const assertReads = async (id: string, want: Buffer, what: string) => {
    assert.equal(await sha256Url(`${url()}/v1/vdis/${id}/contents`), sha256(want), `${what}: its bytes`);
    const at = 3 * MiB - 100;
    const range = await fetch(`${url()}/v1/vdis/${id}/contents`, {
      headers: { range: `bytes=${at}-${at + 2 * MiB}` },
    });
    assert.equal(range.status, 206);
    assert.ok(
      Buffer.from(await range.arrayBuffer()).equals(want.subarray(at, at + 2 * MiB + 1)),
      `${what}: a range`,
    );
    const sum = await api<{ checksum: string }>(url(), 'GET', `/v1/vdis/${id}/checksum?algorithm=sha256`);
    assert.equal(sum.body.checksum, sha256(want), `${what}: the checksum`);
  };
  const assertQcow2Export = async (id: string, want: Buffer, what: string) => {
    const res = await fetch(`${url()}/v1/vdis/${id}/contents?format=qcow2`);
    assert.equal(res.status, 200);
    const file = path.join(work, 'export.qcow2');
    await fsp.writeFile(file, Buffer.from(await res.arrayBuffer()));
    const expected = path.join(work, 'expected.raw');
    await fsp.writeFile(expected, want);
    await execFileP('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'raw', file, expected]).catch((err) =>
      assert.fail(`${what}: its qcow2 export: ${(err as Error).message}`),
    );
  };

  test('after a snapshot, an import adds an overlay of the changed clusters that qemu-img reads as the whole disk', async () => {
    const vdi = await createVdi(url(), SIZE, { image_format: 'qcow2' });
    const base = Buffer.alloc(SIZE);
    seededBytes(DATA, 1).copy(base);
    await importRaw(vdi.id, base);
    assert.equal(await assertQemu(vdi.id, base, 'the flat VDI'), 1);
    const model = new Map<string, Buffer>([[vdi.id, base]]);
    let live: Buffer = base;
    for (let round = 0; round < 3; round++) {
      const snap = await snapshot(vdi.id);
      model.set(snap.id, live);
      const next = changed(live, 10 + round, 8);
      const before = await srBytes();
      await importRaw(vdi.id, next);
      const grown = (await srBytes()) - before;
      // 8 blocks of 64 KiB at most, plus the overlay's header, L1, L2 and refcount clusters
      // (past the depth limit, a flattening copies the data under the layer at the limit).
      if (round + 2 <= DEPTH) {
        assert.ok(grown <= 8 * BLOCK + 6 * BLOCK, `round ${round}: the import grew the SR by ${grown} bytes`);
      }
      live = next;
      model.set(vdi.id, live);
      await mergesDone();
      // One overlay per retained snapshot, up to the depth limit (the layer at the limit is flattened).
      const depth = await assertQemu(vdi.id, live, `round ${round}`);
      assert.equal(depth, Math.min(round + 2, DEPTH), `round ${round}: the chain's depth`);
    }
    for (const [id, want] of model) {
      const what = id === vdi.id ? 'the VDI' : `snapshot ${id}`;
      await assertReads(id, want, what);
      await assertQcow2Export(id, want, what);
      await assertQemu(id, want, what);
    }

    // Rewriting the same bytes adds nothing.
    const before = await srBytes();
    await importRaw(vdi.id, live);
    assert.ok((await srBytes()) - before <= 4 * BLOCK, 'an identical import adds no cluster of data');
    await assertReads(vdi.id, live, 'the VDI after an identical import');
    await assertQemu(vdi.id, live, 'the VDI after an identical import');

    // A resize after a snapshot: the overlay is larger than its backing file.
    await snapshot(vdi.id).then((s) => model.set(s.id, live));
    assert.equal(
      (await api(url(), 'PATCH', `/v1/vdis/${vdi.id}`, { virtual_size: SIZE + 8 * MiB })).status,
      200,
    );
    live = Buffer.concat([live, Buffer.alloc(8 * MiB)]);
    model.set(vdi.id, live);
    await assertReads(vdi.id, live, 'the resized VDI');
    await assertQemu(vdi.id, live, 'the resized VDI');

    // kill -9 and a restart: every VDI and snapshot reads as before.
    await server.stop('SIGKILL');
    server = await spawnServer(dataDir, args);
    await mergesDone();
    for (const [id, want] of model) await assertReads(id, want, `${id} after a kill -9`);
    for (const id of model.keys()) await remove(id);
    await mergesDone();
    assert.deepEqual(
      (await fsp.readdir(srDir)).filter((n) => /\.g\d+\./.test(n)),
      [],
      'every layer file went with the last VDI needing it',
    );
  });

  // qemu-img judges every file after every step: longer than the default timeout on a loaded machine.
  test('a seeded history of imports, snapshots, clones, deletes and merges: qemu-img check and compare after every step', {
    timeout: 600_000,
  }, async () => {
    const rnd = prng(4242);
    const first = await createVdi(url(), SIZE, { image_format: 'qcow2' });
    const start = Buffer.alloc(SIZE);
    seededBytes(DATA, 7).copy(start);
    await importRaw(first.id, start);
    /** Every VDI and snapshot, and the disk it must read as. */
    const model = new Map<string, Buffer>([[first.id, start]]);
    const writable = [first.id];
    const snaps: string[] = [];
    const steps: string[] = [];
    for (let step = 0; step < 20; step++) {
      const r = rnd();
      const pick = <T>(xs: T[]) => xs[Math.floor(rnd() * xs.length)];
      if (r < 0.4 || snaps.length === 0) {
        const id = pick(writable);
        const next = changed(model.get(id) as Buffer, 1000 + step, 4 + Math.floor(rnd() * 40));
        if (rnd() < 0.5 || snaps.length === 0) {
          const s = await snapshot(id);
          snaps.push(s.id);
          model.set(s.id, model.get(id) as Buffer);
          steps.push('snapshot');
        }
        await importRaw(id, next);
        model.set(id, next);
        steps.push('import');
      } else if (r < 0.6) {
        const id = pick(snaps);
        await remove(id);
        snaps.splice(snaps.indexOf(id), 1);
        model.delete(id);
        steps.push('delete snapshot');
      } else if (r < 0.75 && writable.length < 4) {
        const from = pick(snaps);
        const clone = (await api<VdiJson>(url(), 'POST', `/v1/vdis/${from}/clone`)).body;
        writable.push(clone.id);
        model.set(clone.id, model.get(from) as Buffer);
        steps.push('clone');
      } else if (writable.length > 1) {
        const id = pick(writable.slice(1));
        await remove(id);
        writable.splice(writable.indexOf(id), 1);
        model.delete(id);
        steps.push('delete clone');
      } else {
        const id = pick(writable);
        await importRaw(id, model.get(id) as Buffer);
        steps.push('identical import');
      }
      await mergesDone();
      for (const [id, want] of model) {
        const what = `step ${step} (${steps.slice(-2).join(', ')}): ${id}`;
        const depth = await assertQemu(id, want, what);
        assert.ok(depth <= DEPTH, `${what}: a chain of ${depth} past the depth limit`);
        assert.equal(await sha256Url(`${url()}/v1/vdis/${id}/contents`), sha256(want), what);
      }
    }
    const merges = (await api<TaskJson[]>(url(), 'GET', '/v1/tasks?type=merge&limit=1000')).body;
    assert.ok(merges.filter((t) => t.status === 'success').length > 0, 'merges ran');
    const kinds = new Set(steps);
    for (const k of ['snapshot', 'import', 'delete snapshot', 'clone'])
      assert.ok(kinds.has(k), `the history has a ${k}`);
    for (const id of model.keys()) await remove(id);
  });
});
