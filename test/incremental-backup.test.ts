/**
 * The incremental cycle, with qemu-img as judge, driven by the `diskport`
 * CLI against a real server process: a full backup, then rounds of three
 * scattered writes (new data, zeros over data, data in a hole), each
 * followed by a backup run that snapshots and adds a qcow2 delta to the
 * chain. Each delta is close in size to the change, reads as the live disk
 * through its backing chain (`qemu-img compare`), and the vhd delta of the
 * same two snapshots, laid over the base as `qemu-img map` reports its
 * blocks, gives the live disk too. A restore of full + 3 deltas into a
 * fresh VDI equals the live disk. Then the runs that stop: killed, or
 * interrupted mid-download, and continued; and the inputs that are refused.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { api, createVdi, execFileP } from './helpers/api.js';
import { entryArgs } from './helpers/entry.js';
import { prng, ROOT, type ServerProcess, seededBytes, spawnServer, tempDir } from './helpers/server.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 64 * MiB;
const STATE_DIR = path.join(os.tmpdir(), `diskport-backup-state-${process.pid}`);
const CLI_ENV = { DISKPORT_SERVER: '', DISKPORT_TOKEN: '', DISKPORT_STATE_DIR: STATE_DIR };
const QUIET = ['--no-progress', '--json', '--retry-delay', '200'];

interface Manifest {
  vdi: string;
  layers: { snapshot: string; file: string; base: string | null; bytes: number; sha256: string }[];
  pending?: { snapshot?: string; written?: number };
}

function startCli(args: string[]) {
  const child = spawn(process.execPath, [...entryArgs('cli/main'), ...args], {
    cwd: ROOT,
    env: { ...process.env, ...CLI_ENV },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const out = { stdout: '', stderr: '' };
  child.stdout.on('data', (d) => {
    out.stdout += d;
  });
  child.stderr.on('data', (d) => {
    out.stderr += d;
  });
  const closed = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  return { child, out, closed };
}

async function runCli(args: string[]) {
  const run = startCli(args);
  const code = await run.closed;
  return { code, ...run.out };
}

/** Runs the CLI and expects success; resolves with its JSON summary. */
async function cliOk<T = Record<string, unknown>>(args: string[]): Promise<T> {
  const r = await runCli([...args, ...QUIET]);
  assert.equal(r.code, 0, `diskport ${args.join(' ')} exited ${r.code}: ${r.stderr}`);
  return JSON.parse(r.stdout) as T;
}

const readManifest = async (dir: string): Promise<Manifest> =>
  JSON.parse(await fsp.readFile(path.join(dir, 'diskport-backup.json'), 'utf8'));

async function qemuInfo(file: string): Promise<Record<string, unknown>> {
  return JSON.parse((await execFileP('qemu-img', ['info', '--output=json', file])).stdout);
}

/** A disk with data in a few places, and holes between. */
function initial(): Buffer {
  const disk = Buffer.alloc(SIZE);
  seededBytes(6 * MiB, 1).copy(disk, 0);
  seededBytes(4 * MiB, 2).copy(disk, 20 * MiB);
  seededBytes(5 * MiB, 3).copy(disk, 44 * MiB);
  return disk;
}

/** Round `r`'s three scattered writes: new data, zeros over data, data in a hole. Returns the bytes changed. */
function writeRound(disk: Buffer, r: number): number {
  const rnd = prng(100 + r);
  const at = (lo: number, hi: number) => lo + Math.floor((rnd() * (hi - lo)) / (4 * KiB)) * 4 * KiB;
  const writes: [number, number, 'data' | 'zero'][] = [
    [at(0, 5 * MiB), 256 * KiB, 'data'],
    [at(20 * MiB, 23 * MiB), 128 * KiB, 'zero'],
    [at(30 * MiB, 40 * MiB), 320 * KiB, 'data'],
  ];
  for (const [i, [off, len, kind]] of writes.entries()) {
    if (kind === 'zero') disk.fill(0, off, off + len);
    else seededBytes(len, r * 10 + i).copy(disk, off);
  }
  return writes.reduce((n, [, len]) => n + len, 0);
}

/** A TCP proxy that passes bytes each way at `bytesPerSecond`: a transfer long enough to stop midway. */
async function slowProxy(target: string, bytesPerSecond: number) {
  const { hostname, port } = new URL(target);
  const sockets = new Set<net.Socket>();
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(port), hostname);
    sockets.add(client).add(upstream);
    const pace = (from: net.Socket, to: net.Socket) => {
      from.on('data', (chunk: Buffer) => {
        from.pause();
        to.write(chunk);
        setTimeout(() => from.resume(), (chunk.length / bytesPerSecond) * 1000);
      });
      from.on('end', () => to.end());
    };
    pace(client, upstream);
    pace(upstream, client);
    const close = () => {
      client.destroy();
      upstream.destroy();
    };
    client.on('error', close).on('close', close);
    upstream.on('error', close).on('close', close);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const { port: p } = server.address() as net.AddressInfo;
  return {
    url: `http://127.0.0.1:${p}`,
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise((r) => server.close(r));
    },
  };
}

async function until(what: string, check: () => Promise<boolean>, timeoutMs = 120_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

describe('incremental backup and restore with the diskport CLI', () => {
  let srv: ServerProcess;
  let work: string;
  before(async () => {
    work = await tempDir('diskport-backup-');
    srv = await spawnServer(path.join(work, 'data'));
  });
  after(async () => {
    await srv.stop();
    await fsp.rm(work, { recursive: true, force: true });
    await fsp.rm(STATE_DIR, { recursive: true, force: true });
  });

  const importRaw = async (id: string, body: Buffer) => {
    const res = await fetch(`${srv.url}/v1/vdis/${id}/contents?format=raw`, {
      method: 'PUT',
      body: new Uint8Array(body),
    });
    assert.equal(res.status, 200, await res.text());
  };
  const vdiUrl = (id: string, base = srv.url) => `${base}/v1/vdis/${id}`;
  const backupSnapshots = async (id: string) => {
    const res = await api<{ id: string; name_label: string }[]>(srv.url, 'GET', `/v1/vdis/${id}/snapshots`);
    return res.body.filter((s) => s.name_label.startsWith('diskport backup ')).map((s) => s.id);
  };

  test('The incremental cycle with qemu-img as judge: a full backup, three rounds of scattered writes each backed up as a qcow2 delta (and checked as a vhd delta), then a restore of full + 3 deltas', async () => {
    const dir = path.join(work, 'cycle');
    const vdi = (await createVdi(srv.url, SIZE)).id;
    const live = initial();
    await importRaw(vdi, live);
    const full = await cliOk<{ kind: string; snapshot: string; file: string }>([
      'backup',
      vdiUrl(vdi),
      dir,
      '--keep-snapshots',
      '2',
    ]);
    assert.equal(full.kind, 'full');
    assert.equal(full.file, path.join(dir, `${full.snapshot}.qcow2`));
    const liveRaw = path.join(work, 'live.raw');
    await fsp.writeFile(liveRaw, live);
    await execFileP('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', full.file, liveRaw]);
    const states = [Buffer.from(live)];

    for (let round = 1; round <= 3; round++) {
      const changed = writeRound(live, round);
      await importRaw(vdi, live);
      await fsp.writeFile(liveRaw, live);
      states.push(Buffer.from(live));
      const run = await cliOk<{ kind: string; snapshot: string; base: string; file: string; bytes: number }>([
        'backup',
        vdiUrl(vdi),
        dir,
        '--keep-snapshots',
        '2',
      ]);
      const m = await readManifest(dir);
      const prev = m.layers[round - 1].snapshot;
      assert.equal(run.kind, 'delta');
      assert.equal(run.base, prev, "each delta is against the previous run's snapshot");
      // qcow2: the delta is an overlay over the previous file; qemu reads the live disk through the chain.
      const info = await qemuInfo(run.file);
      assert.equal(info['backing-filename'], `${prev}.qcow2`);
      assert.ok(
        run.bytes < changed + 1 * MiB,
        `round ${round}: a qcow2 delta of ${run.bytes} bytes for ${changed} changed`,
      );
      await execFileP('qemu-img', ['check', run.file]);
      await execFileP('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', run.file, liveRaw]);
      const chain = JSON.parse(
        (await execFileP('qemu-img', ['info', '--backing-chain', '--output=json', run.file])).stdout,
      ) as unknown[];
      assert.equal(chain.length, round + 1, 'qemu-img follows the chain down to the full export');

      // vhd: the same two snapshots as a differencing VHD; its blocks laid over the base give the live disk.
      const vhd = path.join(work, `round-${round}.vhd`);
      const res = await fetch(`${srv.url}/v1/vdis/${run.snapshot}/contents?format=vhd&base=${prev}`);
      assert.equal(res.status, 200);
      await fsp.writeFile(vhd, Buffer.from(await res.arrayBuffer()));
      const vhdBytes = (await fsp.stat(vhd)).size;
      // 2 MiB VHD blocks: three writes touch at most six of them.
      assert.ok(
        vhdBytes < 6 * (2 * MiB + 512) + 64 * KiB,
        `round ${round}: a vhd delta of ${vhdBytes} bytes`,
      );
      const map = JSON.parse(
        (await execFileP('qemu-img', ['map', '--output=json', '-f', 'vpc', vhd])).stdout,
      ) as { start: number; length: number; data: boolean }[];
      const own = path.join(work, 'own.raw');
      await execFileP('qemu-img', ['convert', '-f', 'vpc', '-O', 'raw', vhd, own]);
      const ownBytes = await fsp.readFile(own);
      // The base as the backup holds it: qemu-img reads the previous file through its chain.
      const baseRaw = path.join(work, 'base.raw');
      await execFileP('qemu-img', ['convert', '-O', 'raw', path.join(dir, `${prev}.qcow2`), baseRaw]);
      const rebuilt = await fsp.readFile(baseRaw);
      assert.ok(rebuilt.equals(states[round - 1]), 'the previous file reads as the disk at its backup');
      for (const e of map) if (e.data) ownBytes.copy(rebuilt, e.start, e.start, e.start + e.length);
      assert.ok(
        rebuilt.equals(live),
        `round ${round}: the base overlaid with the vhd delta's blocks is the live disk`,
      );
    }
    const m = await readManifest(dir);
    assert.deepEqual(
      m.layers.map((l) => l.base),
      [null, ...m.layers.slice(0, 3).map((l) => l.snapshot)],
    );
    assert.deepEqual(
      new Set(await backupSnapshots(vdi)),
      new Set(m.layers.slice(2).map((l) => l.snapshot)),
      'the snapshots of all but the 2 newest runs are deleted on the server',
    );
    // Every file of the chain reads as the disk was at its backup.
    for (const [i, layer] of m.layers.entries()) {
      const raw = path.join(work, 'at.raw');
      await execFileP('qemu-img', ['convert', '-O', 'raw', path.join(dir, layer.file), raw]);
      assert.ok((await fsp.readFile(raw)).equals(states[i]), `the file of run ${i} reads as the disk then`);
    }

    // Restore: full + 3 deltas into a fresh VDI is the live disk; --at an older run, the disk then.
    const fresh = (await createVdi(srv.url, SIZE)).id;
    const restored = await cliOk<{ layers: number; sha256: string; bytes_sent: number }>([
      'restore',
      dir,
      vdiUrl(fresh),
    ]);
    assert.equal(restored.layers, 4);
    assert.equal(restored.sha256, m.layers[3].sha256);
    const back = Buffer.from(
      await (await fetch(`${srv.url}/v1/vdis/${fresh}/contents?format=raw`)).arrayBuffer(),
    );
    assert.ok(back.equals(live), 'the restored VDI is the live disk, byte for byte');
    assert.deepEqual(await backupSnapshots(fresh), [], 'no snapshot of the restore is left on the VDI');
    const marks = await api<unknown[]>(srv.url, 'GET', `/v1/vdis/${fresh}/snapshots`);
    assert.deepEqual(marks.body, []);
    const older = await cliOk<{ layers: number }>([
      'restore',
      dir,
      vdiUrl(fresh),
      '--at',
      m.layers[1].snapshot,
    ]);
    assert.equal(older.layers, 2);
    const then = Buffer.from(
      await (await fetch(`${srv.url}/v1/vdis/${fresh}/contents?format=raw`)).arrayBuffer(),
    );
    assert.ok(then.equals(states[1]), 'restore --at gives the disk as it was at that run');
  });

  test('a restore stopped between layers is continued by the next run after the layers already in the VDI; one whose VDI was written meanwhile starts over', async () => {
    const dir = path.join(work, 'stopped-restore');
    const vdi = (await createVdi(srv.url, SIZE)).id;
    const live = initial();
    await importRaw(vdi, live);
    await cliOk(['backup', vdiUrl(vdi), dir]);
    for (let round = 1; round <= 3; round++) {
      writeRound(live, round);
      await importRaw(vdi, live);
      await cliOk(['backup', vdiUrl(vdi), dir]);
    }
    const target = (await createVdi(srv.url, SIZE)).id;
    const stopped = startCli(['restore', dir, vdiUrl(target), ...QUIET]);
    await until('two layers to be in the VDI', async () => /layer 2 of 4/.test(stopped.out.stderr));
    stopped.child.kill('SIGTERM');
    await stopped.closed;
    const again = await cliOk<{ layers_resumed: number }>(['restore', dir, vdiUrl(target)]);
    assert.ok(again.layers_resumed >= 2, `the rerun continued after ${again.layers_resumed} layers`);
    const back = Buffer.from(
      await (await fetch(`${srv.url}/v1/vdis/${target}/contents?format=raw`)).arrayBuffer(),
    );
    assert.ok(back.equals(live));

    // Stopped again, then the VDI is written by someone else: the next run cannot lay deltas on it.
    // kill -9 once a layer is in the VDI and the next one's upload session is open (and saved).
    const other = (await createVdi(srv.url, SIZE)).id;
    const proxy = await slowProxy(srv.url, 4 * MiB);
    const cut = startCli(['restore', dir, vdiUrl(other, proxy.url), ...QUIET]);
    // The CLI keeps one upload per VDI, in a file named by a hash of the VDI (cli/saved-sessions.ts).
    const key = createHash('sha256')
      .update(JSON.stringify(['upload', other]))
      .digest('hex')
      .slice(0, 32);
    const saved = async () =>
      fsp.access(path.join(STATE_DIR, `upload-${key}.json`)).then(
        () => true,
        () => false,
      );
    await until(
      'a layer in the VDI and the next one uploading',
      async () => /layer \d of 4/.test(cut.out.stderr) && (await saved()),
    );
    cut.child.kill('SIGKILL');
    await cut.closed;
    await proxy.close();
    // Its open upload session holds the VDI: end it as a user would, then someone else writes the VDI.
    const m = await readManifest(dir);
    const layer = [...m.layers].reverse().find((l) => cut.out.stderr.includes(l.file)) ?? m.layers[0];
    const next = m.layers[m.layers.indexOf(layer) + 1];
    const cancelled = await runCli([
      'upload',
      path.join(dir, next.file),
      '--vdi',
      other,
      '--server',
      srv.url,
      '--cancel',
    ]);
    assert.equal(cancelled.code, 0, cancelled.stderr);
    await until('the VDI to take a write', async () => {
      const res = await fetch(`${srv.url}/v1/vdis/${other}/contents?format=raw`, {
        method: 'PUT',
        body: new Uint8Array(Buffer.alloc(SIZE, 7)),
      }).catch(() => undefined); // refused before its body was read: the socket closes under it
      if (!res) return false;
      const text = await res.text();
      if (res.status === 409 && /VDI_BUSY/.test(text)) return false;
      assert.equal(res.status, 200, text);
      return true;
    });
    const over = await runCli(['restore', dir, vdiUrl(other), ...QUIET]);
    assert.equal(over.code, 0, over.stderr);
    assert.match(over.stderr, /changed since the stopped restore .* starting over from the full export/);
    const now = Buffer.from(
      await (await fetch(`${srv.url}/v1/vdis/${other}/contents?format=raw`)).arrayBuffer(),
    );
    assert.ok(now.equals(live));
  });

  test('a backup killed (-9) after its snapshot, or interrupted mid-download, is continued by the next run on the same snapshot', async () => {
    const dir = path.join(work, 'killed');
    const vdi = (await createVdi(srv.url, SIZE)).id;
    const disk = Buffer.alloc(SIZE);
    seededBytes(40 * MiB, 9).copy(disk, 8 * MiB);
    await importRaw(vdi, disk);
    const proxy = await slowProxy(srv.url, 8 * MiB);
    try {
      // kill -9 once the part file has bytes: the snapshot is recorded, the rerun takes it up.
      const killed = startCli(['backup', vdiUrl(vdi, proxy.url), dir, ...QUIET]);
      let snap = '';
      await until('the first run to write its file', async () => {
        const m = await readManifest(dir).catch(() => undefined);
        snap = m?.pending?.snapshot ?? '';
        const st = snap && (await fsp.stat(path.join(dir, `${snap}.qcow2.part`)).catch(() => undefined));
        return Boolean(st && st.size > 0);
      });
      killed.child.kill('SIGKILL');
      await killed.closed;
      // SIGTERM mid-download: what arrived is synced and checkpointed.
      const stopped = startCli(['backup', vdiUrl(vdi, proxy.url), dir, ...QUIET]);
      await until(
        'the second run to be downloading',
        async () =>
          /resuming|backup/.test(stopped.out.stderr) &&
          (await fsp.stat(path.join(dir, `${snap}.qcow2.part`)).then(
            (s) => s.size > 4 * MiB,
            () => false,
          )),
      );
      stopped.child.kill('SIGTERM');
      assert.equal(await stopped.closed, 130, stopped.out.stderr);
      assert.match(stopped.out.stderr, /run the same command again to resume/);
      const kept = (await readManifest(dir)).pending?.written ?? 0;
      assert.ok(kept > 0, 'the interrupted run checkpointed what it had written');
    } finally {
      await proxy.close();
    }
    const done = await cliOk<{ snapshot: string; kind: string; bytes_resumed: number }>([
      'backup',
      vdiUrl(vdi),
      dir,
    ]);
    const m = await readManifest(dir);
    assert.equal(m.pending, undefined);
    assert.equal(done.kind, 'full');
    assert.ok(done.bytes_resumed > 0, 'the last run continued the interrupted one');
    assert.deepEqual(
      await backupSnapshots(vdi),
      [done.snapshot],
      'no snapshot taken twice, none left behind',
    );
    const liveRaw = path.join(work, 'killed.raw');
    await fsp.writeFile(liveRaw, disk);
    await execFileP('qemu-img', [
      'compare',
      '-f',
      'qcow2',
      '-F',
      'raw',
      path.join(dir, `${done.snapshot}.qcow2`),
      liveRaw,
    ]);
  });

  test('bad inputs: a directory that is not a backup, one of another VDI, a missing VDI, a URL that names no VDI, a VDI of another size, a damaged file', async () => {
    const vdi = (await createVdi(srv.url, MiB)).id;
    const other = (await createVdi(srv.url, MiB)).id;
    const notBackup = path.join(work, 'not-a-backup');
    await fsp.mkdir(notBackup);
    await fsp.writeFile(path.join(notBackup, 'notes.txt'), 'hello');
    let r = await runCli(['backup', vdiUrl(vdi), notBackup]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /is not a diskport backup .* give a new or empty directory/);
    assert.deepEqual(await fsp.readdir(notBackup), ['notes.txt'], 'nothing written into it');

    const mine = path.join(work, 'mine');
    await cliOk(['backup', vdiUrl(vdi), mine]);
    r = await runCli(['backup', vdiUrl(other), mine]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, new RegExp(`holds backups of VDI ${vdi}, not of ${other}`));

    const missing = '00000000-0000-4000-8000-000000000000';
    r = await runCli(['backup', vdiUrl(missing), path.join(work, 'none')]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, new RegExp(`VDI ${missing} does not exist`));
    await assert.rejects(fsp.stat(path.join(work, 'none')), 'no directory made for a VDI that is not there');

    r = await runCli(['backup', `${srv.url}/v1/srs/local`, path.join(work, 'none')]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /does not name a VDI/);

    // restore: a directory that is not a backup, a missing VDI, a VDI of another size, a damaged file.
    r = await runCli(['restore', notBackup, vdiUrl(vdi)]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /is not a diskport backup \(it has no diskport-backup.json\)/);
    r = await runCli(['restore', mine, vdiUrl(missing)]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, new RegExp(`VDI ${missing} does not exist`));
    const bigger = (await createVdi(srv.url, 2 * MiB)).id;
    r = await runCli(['restore', mine, vdiUrl(bigger)]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /restore into a VDI of 1048576 bytes/);
    r = await runCli(['restore', mine, vdiUrl(other), '--at', missing]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /holds no run of snapshot/);
    const [layer] = (await readManifest(mine)).layers;
    await fsp.truncate(path.join(mine, layer.file), layer.bytes - 512);
    r = await runCli(['restore', mine, vdiUrl(other)]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /is .* not the .* it was written with: the file is damaged/);
  });
});
