/**
 * What the chain and merge tests share: an SR served by a real process they
 * can kill, the VDI calls they make, and the checks they judge an SR by (every
 * VDI reads as its model, the SR holds exactly the files its rows name, what
 * it allocates, what qemu-img says of a qcow2 chain).
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { api, execFileP, sha256Url } from './api.js';
import { queryAt } from './pg.js';
import { prng, type ServerProcess, seededBytes, spawnServer, tempDir } from './server.js';
import { waitFor } from './wait.js';

const MiB = 1024 * 1024;
const BLOCK = 64 * 1024;

export const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/**
 * `disk` with `blocks` seeded 64 KiB blocks rewritten: below `zeros` (a draw
 * per block) with zeros, below `fresh` with new data, the rest with what they held.
 */
export function changedBlocks(
  disk: Buffer,
  seed: number,
  blocks: number,
  zeros: number,
  fresh = 0.9,
): Buffer {
  const out = Buffer.from(disk);
  const rnd = prng(seed);
  const data = seededBytes(blocks * BLOCK, seed);
  for (let i = 0; i < blocks; i++) {
    const at = Math.floor(rnd() * (out.length / BLOCK)) * BLOCK;
    const r = rnd();
    if (r < zeros) out.fill(0, at, at + BLOCK);
    else if (r < fresh) data.copy(out, at, i * BLOCK, (i + 1) * BLOCK);
  }
  return out;
}

/** Where a test's SR is; read at each use, as a restart replaces the server. */
export interface SrPlace {
  readonly url: string;
  readonly dataDir: string;
  readonly srDir: string;
}

export interface SpawnedSr extends SrPlace {
  server: ServerProcess;
  /** Starts the server again on the same data directory, with the same arguments. */
  start(): Promise<void>;
}

/** A server process with `args` over a fresh data directory, for the enclosing describe. */
export function spawnedSr(args: string[] = []): SpawnedSr {
  let dataDir = '';
  const sr: SpawnedSr = {
    server: undefined as unknown as ServerProcess,
    get url() {
      return sr.server.url;
    },
    get dataDir() {
      return dataDir;
    },
    get srDir() {
      return path.join(dataDir, 'srs', 'local');
    },
    async start() {
      sr.server = await spawnServer(dataDir, args);
    },
  };
  before(async () => {
    dataDir = await tempDir();
    await sr.start();
  });
  after(async () => {
    await sr.server.stop();
    await fsp.rm(dataDir, { recursive: true, force: true });
  });
  return sr;
}

/** The tasks list's fields the merge tests read. */
export type MergeTask = {
  id: string;
  status: string;
  created_at: string;
  started_at: string | null;
  finished_at: string | null;
  error: { code: string } | null;
};

/** SR files that hold a layer (`<id>.g<generation>.<format>`, parents under their content id). */
export const layerFiles = async (srDir: string) =>
  (await fsp.readdir(srDir)).filter((n) => /\.g\d+\./.test(n));

/** Contents no VDI names with exactly one child: each one a down merge still due. */
export function orphanLayers(dataDir: string): number {
  const [orphans] = queryAt<{ n: number }>(
    dataDir,
    `SELECT COUNT(*) AS n FROM contents c WHERE NOT EXISTS (SELECT 1 FROM vdis v WHERE v.content_id = c.id)
     AND (SELECT COUNT(*) FROM contents k WHERE k.parent = c.id) = 1`,
  );
  return Number(orphans.n);
}

/** Calls and checks on the SR at `sr`, whose chains are at most `depth` layers deep. */
export function chainChecks(sr: SrPlace, depth = Number.POSITIVE_INFINITY) {
  const importRaw = async (id: string, body: Buffer) => {
    const res = await fetch(`${sr.url}/v1/vdis/${id}/contents?format=raw`, {
      method: 'PUT',
      body: new Uint8Array(body),
    });
    assert.equal(res.status, 200, await res.text());
  };
  const snapshot = async <T = { id: string }>(id: string) => {
    const res = await api<T>(sr.url, 'POST', `/v1/vdis/${id}/snapshots`);
    assert.equal(res.status, 201, JSON.stringify(res.body));
    return res.body;
  };
  const remove = async (id: string) => {
    assert.equal((await fetch(`${sr.url}/v1/vdis/${id}`, { method: 'DELETE' })).status, 204);
  };
  const mergeTasks = async <T = MergeTask>() =>
    (await api<T[]>(sr.url, 'GET', '/v1/tasks?type=merge&limit=1000')).body;
  /** The rows `sql` finds in the SR's metadata, read beside the server (SQLite's file or its PostgreSQL database). */
  const query = <T = Record<string, unknown>>(sql: string, ...params: unknown[]): T[] =>
    queryAt<T>(sr.dataDir, sql, ...params);
  /** The path of the top file of a VDI's chain. */
  const fileOf = (id: string) =>
    path.join(
      sr.srDir,
      query<{ file_name: string }>('SELECT file_name FROM vdis WHERE id = ?', id)[0].file_name,
    );
  /** Bytes allocated in the SR directory, each inode once. */
  const srBytes = async () => {
    const seen = new Set<number>();
    let n = 0;
    for (const name of await fsp.readdir(sr.srDir)) {
      // A commit unlinks the file it replaced after it answers.
      const st = await fsp.stat(path.join(sr.srDir, name)).catch(() => null);
      if (!st?.isFile() || seen.has(st.ino)) continue;
      seen.add(st.ino);
      n += st.blocks * 512;
    }
    return n;
  };
  /** Every VDI and snapshot of `model` reads as its bytes there. */
  const assertModel = async (model: Map<string, Buffer>, what: string) => {
    for (const [id, want] of model) {
      assert.equal(await sha256Url(`${sr.url}/v1/vdis/${id}/contents`), sha256(want), `${what}: ${id}`);
    }
  };
  /** A VDI's bytes, a ranged read across 3 MiB, and its checksum, against `want`. */
  const assertReads = async (id: string, want: Buffer, what: string) => {
    assert.equal(await sha256Url(`${sr.url}/v1/vdis/${id}/contents`), sha256(want), `${what}: its bytes`);
    const at = 3 * MiB - 100;
    const range = await fetch(`${sr.url}/v1/vdis/${id}/contents`, {
      headers: { range: `bytes=${at}-${at + 2 * MiB}` },
    });
    assert.equal(range.status, 206);
    assert.ok(
      Buffer.from(await range.arrayBuffer()).equals(want.subarray(at, at + 2 * MiB + 1)),
      `${what}: a range`,
    );
    const sum = await api<{ checksum: string }>(sr.url, 'GET', `/v1/vdis/${id}/checksum?algorithm=sha256`);
    assert.equal(sum.body.checksum, sha256(want), `${what}: the checksum`);
  };
  /** The SR holds exactly the files rows name: VDIs' files, their digests, parents kept under their ids. */
  const assertFilesMatchRows = async () => {
    const live = new Set<string>();
    for (const r of query<{ file_name: string; digest_file: string | null }>(
      'SELECT file_name, digest_file FROM vdis',
    )) {
      live.add(r.file_name);
      if (r.digest_file) live.add(r.digest_file);
    }
    for (const r of query<{ parent: string }>(
      'SELECT DISTINCT parent FROM contents WHERE parent IS NOT NULL',
    ))
      live.add(r.parent);
    assert.deepEqual(
      (await layerFiles(sr.srDir)).sort(),
      [...live].sort(),
      'the SR holds the files rows name',
    );
  };
  /** No merge running or pending, and no down merge left to plan. */
  const layersMerged = () =>
    waitFor(
      'the merges to be done',
      async () => {
        const tasks = await mergeTasks();
        if (tasks.some((t) => t.status === 'running' || t.status === 'pending')) return false;
        return orphanLayers(sr.dataDir) === 0;
      },
      { timeoutMs: 120_000, intervalMs: 50 },
    );
  /** Merges the chains still call for: down merges, and chains deeper than `depth`. */
  const mergesDue = () => {
    const parents = new Map(
      query<{ id: string; parent: string | null }>('SELECT id, parent FROM contents').map((r) => [
        r.id,
        r.parent,
      ]),
    );
    let deep = 0;
    for (const { content_id } of query<{ content_id: string }>('SELECT content_id FROM vdis')) {
      let layers = 0;
      for (let at: string | null = content_id; at !== null; layers++) at = parents.get(at) ?? null;
      if (layers > depth) deep++;
    }
    return orphanLayers(sr.dataDir) + deep;
  };
  /** No merge running, and none due. */
  const mergesDone = () =>
    waitFor(
      'the merges to be done',
      async () => (await mergeTasks()).every((t) => t.status !== 'running') && mergesDue() === 0,
      { timeoutMs: 120_000, intervalMs: 50 },
    );
  return {
    importRaw,
    snapshot,
    remove,
    mergeTasks,
    query,
    fileOf,
    srBytes,
    assertModel,
    assertReads,
    assertFilesMatchRows,
    layersMerged,
    mergesDue,
    mergesDone,
  };
}

/**
 * qemu-img's verdict on a qcow2 file: `check` clean, and `compare` equal to
 * `want` (written to `expected` for it).
 */
export async function assertQcow2Reads(file: string, want: Buffer, expected: string, what: string) {
  const qemu = (args: string[]) =>
    execFileP('qemu-img', args).catch((err) => {
      const e = err as { stdout?: string; stderr?: string };
      assert.fail(`${what}: qemu-img ${args[0]} of ${path.basename(file)}: ${e.stdout}${e.stderr}`);
    });
  await qemu(['check', '-q', '-f', 'qcow2', file]);
  await fsp.writeFile(expected, want);
  await qemu(['compare', '-q', '-f', 'qcow2', '-F', 'raw', file, expected]);
}

/** One round of {@link killsDuringMerges}, as a test's own round sees it. */
export interface KillRound {
  round: number;
  /** The VDI's bytes before this round, and the ones this round imports. */
  previous: Buffer;
  live: Buffer;
  model: Map<string, Buffer>;
  /** Waits for the merges the restart runs again, then judges every VDI and the SR's files. */
  settle(): Promise<void>;
}

/**
 * The kill -9 harness of the merge tests: round after round, a snapshot of
 * `vdi`, an import of seeded changes to 256-511 blocks (past the depth limit it leaves a
 * flattening behind it), and a delete of the oldest snapshot now and then (a
 * down merge); then a kill at a seeded moment within the time a merge took
 * here (measured on round -1, left to finish), a restart, and every VDI and
 * snapshot read byte for byte, right away and once the merges ran again.
 * `instead` may run a round its own way (returning the VDI's bytes after it)
 * or return undefined to leave it to the usual one; `check` judges the SR
 * further after the merges.
 */
export async function killsDuringMerges(
  sr: SpawnedSr,
  checks: ReturnType<typeof chainChecks>,
  o: {
    vdi: string;
    first: Buffer;
    kills: number;
    rnd: () => number;
    instead?: (r: KillRound) => Promise<Buffer | undefined>;
    check?: (model: Map<string, Buffer>, what: string) => Promise<void>;
  },
): Promise<{ span: number; interrupted: number }> {
  const { importRaw, remove, mergeTasks, mergesDone, assertModel, assertFilesMatchRows } = checks;
  let live = o.first;
  const model = new Map<string, Buffer>([[o.vdi, live]]);
  const snaps: string[] = [];
  // How long a merge takes here, measured on one left to finish; kills land within it.
  let span = 0;
  let interrupted = 0;
  for (let round = -1; round < o.kills; round++) {
    const snap = (await api<{ id: string }>(sr.url, 'POST', `/v1/vdis/${o.vdi}/snapshots`)).body;
    snaps.push(snap.id);
    model.set(snap.id, live);
    const previous = live;
    live = changedBlocks(live, 100 + round, 256 + Math.floor(o.rnd() * 256), 0.1);
    const before = (await mergeTasks()).length;
    const settle = async () => {
      await mergesDone();
      await assertModel(model, `round ${round}, after the merges ran again`);
      await o.check?.(model, `round ${round}`);
      await assertFilesMatchRows();
    };
    const own = await o.instead?.({ round, previous, live, model, settle });
    if (own) {
      live = own;
      continue;
    }
    await importRaw(o.vdi, live);
    model.set(o.vdi, live);
    if (snaps.length > 2 || o.rnd() < 0.3) {
      const oldest = snaps.shift() as string;
      await remove(oldest);
      model.delete(oldest);
    }
    if (round < 0) {
      await mergesDone();
      const tasks = (await mergeTasks()).slice(0, (await mergeTasks()).length - before);
      for (const t of tasks)
        span = Math.max(span, Date.parse(t.finished_at ?? '') - Date.parse(t.created_at));
      span = Math.max(20, span);
      continue;
    }
    await sleep(Math.floor(o.rnd() * span * 1.5));
    await sr.server.stop('SIGKILL');
    await sr.start();

    await assertModel(model, `round ${round}, right after the restart`);
    // A merge the kill cut is recorded as interrupted at the restart.
    interrupted = (await mergeTasks()).filter((t) => t.error?.code === 'INTERRUPTED').length;
    await settle();
    assert.deepEqual(await fsp.readdir(path.join(sr.srDir, '.staging')), []);
  }
  return { span, interrupted };
}
