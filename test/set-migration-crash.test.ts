/**
 * Set migration across kill -9: the source killed mid-copy resumes at its
 * restart, the destination killed mid-copy is waited for and the source
 * goes on once it is back. Either way the copy is byte-exact, the parent
 * task's progress never goes back, and what crosses the wire is the data
 * once, plus at most what was in flight at the kill (a counting proxy in
 * front of the destination, advertised by its --public-url, says).
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { promises as fsp } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { CHUNK_BYTES } from '../src/transfer/migration-copy.js';
import { api, createVdi, curl, execFileP } from './helpers/api.js';
import { type CutProxy, cutProxy } from './helpers/proxy.js';
import { type ServerProcess, spawnServer, tempDir } from './helpers/server.js';

const MiB = 1024 * 1024;

type Task = {
  id: string;
  status: string;
  progress: number;
  bytes_done: number;
  bytes_total: number | null;
  error: { code: string; message: string } | null;
  result: {
    disks: { vdi: string; task: string | null; dest_vdi: string | null }[];
    final_snapshots?: { vdi: string; snapshot: string }[];
  } | null;
};

async function freePort(): Promise<number> {
  const server = net.createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as net.AddressInfo;
  await new Promise((r) => server.close(r));
  return port;
}

async function checksum(base: string, vdi: string): Promise<string> {
  const res = await api<{ checksum: string }>(base, 'GET', `/v1/vdis/${vdi}/checksum?async=false`);
  assert.equal(res.status, 200, JSON.stringify(res.body));
  return res.body.checksum;
}

async function randomFile(dir: string, name: string, bytes: number): Promise<string> {
  const file = path.join(dir, name);
  await execFileP('sh', ['-c', `head -c ${bytes} /dev/urandom > '${file}'`]);
  return file;
}

/** A set of a raw disk with `bigBytes` of data and a vhd one with 16 MiB; their checksums and data bytes. */
async function makeSet(base: string, work: string, bigBytes: number) {
  const big = await createVdi(base, bigBytes);
  await curl([
    '-T',
    await randomFile(work, 'big.raw', bigBytes),
    `${base}/v1/vdis/${big.id}/contents?format=raw`,
  ]);
  const small = await createVdi(base, 32 * MiB, { image_format: 'vhd' });
  await curl([
    '-T',
    await randomFile(work, 'small.raw', 16 * MiB),
    `${base}/v1/vdis/${small.id}/contents?format=raw`,
  ]);
  const set = (
    await api<{ id: string }>(base, 'POST', '/v1/disk-sets', { name_label: 'vm', vdis: [big.id, small.id] })
  ).body;
  return {
    set: set.id,
    vdis: [big.id, small.id],
    sums: [await checksum(base, big.id), await checksum(base, small.id)],
    dataBytes: bigBytes + 16 * MiB,
  };
}

async function receiveToken(dest: string): Promise<string> {
  const res = await api<{ token: string }>(dest, 'POST', '/v1/migrations/receive', {});
  assert.equal(res.status, 201, JSON.stringify(res.body));
  return res.body.token;
}

/** Polls the task until `until` holds for it, recording its progress. */
async function watch(
  base: string,
  id: string,
  progress: number[],
  until: (t: Task) => boolean,
): Promise<Task> {
  for (;;) {
    const t = (await api<Task>(base, 'GET', `/v1/tasks/${id}`)).body;
    progress.push(t.progress);
    if (until(t) || t.status !== 'running') return t;
    await new Promise((r) => setTimeout(r, 20));
  }
}

function assertMonotonic(progress: number[]): void {
  for (let i = 1; i < progress.length; i++) {
    assert.ok(progress[i] >= progress[i - 1], `progress went back at ${i}: ${progress.join(' ')}`);
  }
}

describe('set migration survives kill -9 of either side', () => {
  let work: string;
  let srcDir: string;
  let destDir: string;
  let destPort: number;
  let src: ServerProcess;
  let dest: ServerProcess;
  let proxy: CutProxy;
  const srcArgs = ['--allow-fetch', '127.0.0.0/8'];
  const destArgs = () => ['--port', String(destPort), '--public-url', proxy.url];

  before(async () => {
    work = await tempDir();
    srcDir = await tempDir();
    destDir = await tempDir();
    destPort = await freePort();
    // Every byte the source sends the destination crosses this proxy, counted.
    proxy = await cutProxy(`http://127.0.0.1:${destPort}`, {
      seed: 1,
      cutConnections: 0,
      direction: 'up',
      minBytes: 0,
      maxBytes: 0,
    });
    dest = await spawnServer(destDir, destArgs());
    src = await spawnServer(srcDir, srcArgs);
  });
  after(async () => {
    await src.stop();
    await dest.stop();
    await proxy.close();
    for (const dir of [work, srcDir, destDir]) await fsp.rm(dir, { recursive: true, force: true });
  });

  test('the source killed mid-copy resumes at its restart: byte-exact, progress never back, nothing sent twice but what was in flight', {
    timeout: 600_000,
  }, async () => {
    const s = await makeSet(src.url, work, 512 * MiB);
    const token = await receiveToken(dest.url);
    assert.equal(
      JSON.parse(Buffer.from(token, 'base64url').toString()).url,
      proxy.url,
      'the token names --public-url',
    );
    const sentBefore = proxy.bytesUp;
    const started = await api<Task>(src.url, 'POST', `/v1/disk-sets/${s.set}/migrate`, { dest: token });
    assert.equal(started.status, 202, JSON.stringify(started.body));
    const progress: number[] = [];
    const mid = await watch(src.url, started.body.id, progress, (t) => t.bytes_done >= 128 * MiB);
    assert.equal(mid.status, 'running', 'the kill comes mid-copy');
    await src.stop('SIGKILL');

    src = await spawnServer(srcDir, srcArgs);
    const end = await watch(src.url, started.body.id, progress, () => false);
    assert.equal(end.status, 'success', JSON.stringify(end.error));
    assertMonotonic(progress);
    assert.equal(end.progress, 1);

    const disks = end.result?.disks ?? [];
    for (const [i, vdi] of s.vdis.entries()) {
      const d = disks.find((x) => x.vdi === vdi);
      assert.equal(await checksum(dest.url, d?.dest_vdi as string), s.sums[i], `disk ${i} is byte-exact`);
      assert.equal((await api<Task>(src.url, 'GET', `/v1/tasks/${d?.task}`)).body.status, 'success');
    }
    // The data once, plus at most the chunk in flight at the kill (and a little for headers and JSON).
    const sent = proxy.bytesUp - sentBefore;
    assert.ok(sent >= s.dataBytes, `${sent} bytes crossed, less than the data`);
    assert.ok(
      sent <= s.dataBytes + CHUNK_BYTES + 2 * MiB,
      `${sent} bytes crossed for ${s.dataBytes} of data: more than one chunk sent twice`,
    );
    // Only the final snapshots stay here.
    const snaps = (await api<{ id: string }[]>(src.url, 'GET', '/v1/vdis?is_snapshot=true')).body.map(
      (v) => v.id,
    );
    assert.deepEqual(snaps.sort(), (end.result?.final_snapshots ?? []).map((f) => f.snapshot).sort());
  });

  test('the source killed during a round of changed blocks (its link to the destination down) resumes that round at its restart', {
    timeout: 600_000,
  }, async () => {
    const s = await makeSet(src.url, work, 256 * MiB);
    const [, small] = s.vdis;
    const sentBefore = proxy.bytesUp + proxy.bytesDown;
    // The link goes down half way through the small disk's changes (the full copy crossed before them).
    proxy.downAt = sentBefore + s.dataBytes + 16 * MiB;
    const started = await api<Task>(src.url, 'POST', `/v1/disk-sets/${s.set}/migrate`, {
      dest: await receiveToken(dest.url),
    });
    assert.equal(started.status, 202, JSON.stringify(started.body));
    const progress: number[] = [];
    await watch(src.url, started.body.id, progress, (t) => t.bytes_done > 0);
    // While the big disk is copied, the small one is written anew: the round after the full copy carries it.
    await curl([
      '-T',
      await randomFile(work, 'small2.raw', 32 * MiB),
      `${src.url}/v1/vdis/${small}/contents?format=raw`,
    ]);
    const smallSum = await checksum(src.url, small);
    const cut = await watch(src.url, started.body.id, progress, () => proxy.downAt === undefined);
    assert.equal(cut.status, 'running', 'the link went down during the rounds');
    assert.equal(cut.progress, 1, 'the full copy was done');
    await src.stop('SIGKILL');
    proxy.up();

    src = await spawnServer(srcDir, srcArgs);
    const end = await watch(src.url, started.body.id, progress, () => false);
    assert.equal(end.status, 'success', JSON.stringify(end.error));
    assertMonotonic(progress);
    const disks = end.result?.disks ?? [];
    const destOf = (vdi: string) => disks.find((x) => x.vdi === vdi)?.dest_vdi as string;
    assert.equal(await checksum(dest.url, destOf(s.vdis[0])), s.sums[0]);
    assert.equal(
      await checksum(dest.url, destOf(small)),
      smallSum,
      'the changes made during the copy arrived',
    );
    for (const f of end.result?.final_snapshots ?? []) {
      assert.equal(await checksum(dest.url, destOf(f.vdi)), await checksum(src.url, f.snapshot));
    }
    // The data and the changes once, plus at most a chunk in flight at the cut.
    const sent = proxy.bytesUp + proxy.bytesDown - sentBefore;
    assert.ok(
      sent <= s.dataBytes + 32 * MiB + CHUNK_BYTES + 2 * MiB,
      `${sent} bytes crossed for ${s.dataBytes} of data and 32 MiB of changes`,
    );
  });

  test('the destination killed mid-copy and restarted: the source waits for it and completes, byte-exact', {
    timeout: 600_000,
  }, async () => {
    const s = await makeSet(src.url, work, 512 * MiB);
    const sentBefore = proxy.bytesUp;
    const started = await api<Task>(src.url, 'POST', `/v1/disk-sets/${s.set}/migrate`, {
      dest: await receiveToken(dest.url),
    });
    assert.equal(started.status, 202, JSON.stringify(started.body));
    const progress: number[] = [];
    const mid = await watch(src.url, started.body.id, progress, (t) => t.bytes_done >= 128 * MiB);
    assert.equal(mid.status, 'running', 'the kill comes mid-copy');
    await dest.stop('SIGKILL');
    dest = await spawnServer(destDir, destArgs());

    const end = await watch(src.url, started.body.id, progress, () => false);
    assert.equal(end.status, 'success', JSON.stringify(end.error));
    assertMonotonic(progress);
    const disks = end.result?.disks ?? [];
    for (const [i, vdi] of s.vdis.entries()) {
      const d = disks.find((x) => x.vdi === vdi);
      assert.equal(await checksum(dest.url, d?.dest_vdi as string), s.sums[i], `disk ${i} is byte-exact`);
    }
    // What the destination held durably at the kill was not sent again.
    const sent = proxy.bytesUp - sentBefore;
    assert.ok(
      sent <= s.dataBytes + CHUNK_BYTES + 2 * MiB,
      `${sent} bytes crossed for ${s.dataBytes} of data: more than one chunk sent twice`,
    );
  });
});
