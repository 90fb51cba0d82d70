/**
 * ovirt-imageio's flush semantics on chunk PUTs: `?flush=n` writes a chunk
 * without making it durable, a flush point (flush=y, PATCH {"op":"flush"},
 * finalize, the group commit) makes every written byte durable with one
 * fdatasync and only then records it. What the session and its database row
 * say was received is always durable, so a kill -9 at any moment never makes
 * a resume skip a byte.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { api, createVdi, execFileP, openUpload, sha256Url, type TransferJson } from './helpers/api.js';
import { queryAt } from './helpers/pg.js';
import {
  prng,
  type ServerProcess,
  seededBytes,
  spawnServer,
  startServer,
  type TestServer,
  tempDir,
} from './helpers/server.js';
import { waitFor } from './helpers/wait.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const CHUNK = 64 * KiB;
type Range = [number, number];
type Task = { status: string; error: { code: string } | null };

const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** Whether every range of `inner` lies inside one of `outer`. */
function within(inner: Range[], outer: Range[]): boolean {
  return inner.every(([s, e]) => outer.some(([a, b]) => a <= s && e <= b));
}

/** Merged half-open ranges. */
function merge(ranges: Range[]): Range[] {
  const out: Range[] = [];
  for (const [s, e] of [...ranges].sort((x, y) => x[0] - y[0])) {
    const last = out[out.length - 1];
    if (last && s <= last[1]) last[1] = Math.max(last[1], e);
    else out.push([s, e]);
  }
  return out;
}

/** The session's url on `base` (the url names the server that opened it, which may have restarted since). */
const dataUrl = (base: string, t: TransferJson, query = '') =>
  t.url.replace(/^http:\/\/[^/]+/, base) + (query ? `&${query}` : '');

async function putChunk(base: string, t: TransferJson, image: Buffer, start: number, query = '') {
  const end = Math.min(image.length, start + CHUNK);
  return fetch(dataUrl(base, t, query), {
    method: 'PUT',
    headers: { 'content-range': `bytes ${start}-${end - 1}/${image.length}` },
    body: new Uint8Array(image.subarray(start, end)),
  });
}

async function state(base: string, t: TransferJson): Promise<TransferJson> {
  const res = await api<TransferJson>(base, 'GET', `/v1/transfers/${t.id}?token=${t.token}`);
  assert.equal(res.status, 200, JSON.stringify(res.body));
  return res.body;
}

async function flush(base: string, t: TransferJson) {
  return api<TransferJson>(base, 'PATCH', `/v1/transfers/${t.id}/data?token=${t.token}`, { op: 'flush' });
}

/** What the database row says was received: read by a connection of our own. */
function storedReceived(dataDir: string, id: string): Range[] {
  const [row] = queryAt<{ received: string }>(dataDir, 'SELECT received FROM transfers WHERE id = ?', id);
  return JSON.parse(row.received);
}

/**
 * Sends every chunk of `image` not inside `have` (flushed by default), then
 * finalizes and checks the VDI against `disk` (the image's guest bytes; the
 * image itself for raw).
 */
async function completeAndCheck(
  base: string,
  vdi: string,
  t: TransferJson,
  image: Buffer,
  have: Range[],
  disk: Buffer = image,
) {
  for (let s = 0; s < image.length; s += CHUNK) {
    if (within([[s, Math.min(image.length, s + CHUNK)]], have)) continue;
    const res = await putChunk(base, t, image, s);
    assert.equal(res.status, 200, await res.text());
  }
  const fin = await api<Task>(base, 'POST', `/v1/transfers/${t.id}/finalize?token=${t.token}&wait=60`);
  assert.equal(fin.status, 202, JSON.stringify(fin.body));
  assert.equal(fin.body.status, 'success', JSON.stringify(fin.body));
  assert.equal(await sha256Url(`${base}/v1/vdis/${vdi}/contents`), sha(disk), 'the VDI is byte-exact');
}

describe('flush=n: chunks written now, durable and counted at a flush point', () => {
  let srv: TestServer;
  before(async () => {
    srv = await startServer();
  });
  after(async () => {
    await srv.close();
  });

  test('by default a chunk is durable and counted when answered, in the session and its database row', async () => {
    const image = seededBytes(4 * CHUNK, 1);
    const vdi = (await createVdi(srv.url, image.length)).id;
    const t = await openUpload<TransferJson>(srv.url, vdi, image.length);
    const res = await putChunk(srv.url, t, image, 0);
    assert.equal(res.status, 200);
    const body = (await res.json()) as TransferJson;
    assert.deepEqual(body.received, [[0, CHUNK]]);
    assert.equal(body.unflushed_bytes, 0);
    assert.equal(res.headers.get('upload-offset'), String(CHUNK));
    assert.deepEqual(storedReceived(srv.dataDir, t.id), [[0, CHUNK]]);
    await completeAndCheck(srv.url, vdi, t, image, body.received);
  });

  test('flush=n chunks count only after PATCH {"op":"flush"}, and the database hears of them only then', async () => {
    const image = seededBytes(16 * CHUNK, 2);
    const vdi = (await createVdi(srv.url, image.length)).id;
    // The group commit (1 s after the first unflushed byte) may beat a slow
    // round to its check: such a round says so and runs again.
    for (let attempt = 1; ; attempt++) {
      const t = await openUpload<TransferJson>(srv.url, vdi, image.length);
      await putChunk(srv.url, t, image, 0).then((r) => r.arrayBuffer()); // flushed: the base line
      for (let s = CHUNK; s < 8 * CHUNK; s += CHUNK) {
        const res = await putChunk(srv.url, t, image, s, 'flush=n');
        assert.equal(res.status, 200, await res.clone().text());
        const body = (await res.json()) as TransferJson;
        assert.equal(res.headers.get('upload-offset'), String(body.upload_offset));
      }
      // The row first: a group commit that lands between the two shows in the session's state.
      const stored = storedReceived(srv.dataDir, t.id);
      const before = await state(srv.url, t);
      if (before.unflushed_bytes !== 7 * CHUNK) {
        assert.ok(attempt < 3, `the group commit ran before the check ${attempt} times`);
        await api(srv.url, 'DELETE', `/v1/transfers/${t.id}`);
        continue;
      }
      assert.deepEqual(before.received, [[0, CHUNK]], 'unflushed chunks are not claimed as received');
      assert.equal(before.upload_offset, CHUNK);
      assert.deepEqual(stored, [[0, CHUNK]], 'nor recorded in the database');
      const head = await fetch(dataUrl(srv.url, t), { method: 'HEAD' });
      assert.equal(head.headers.get('upload-offset'), String(CHUNK));

      const flushed = await flush(srv.url, t);
      assert.equal(flushed.status, 200, JSON.stringify(flushed.body));
      assert.deepEqual(flushed.body.received, [[0, 8 * CHUNK]]);
      assert.equal(flushed.body.unflushed_bytes, 0);
      assert.equal(flushed.headers.get('upload-offset'), String(8 * CHUNK));
      assert.deepEqual(storedReceived(srv.dataDir, t.id), [[0, 8 * CHUNK]]);
      await completeAndCheck(srv.url, vdi, t, image, flushed.body.received);
      return;
    }
  });

  test('a flush=y chunk is a flush point for the flush=n chunks before it', async () => {
    const image = seededBytes(8 * CHUNK, 3);
    const vdi = (await createVdi(srv.url, image.length)).id;
    const t = await openUpload<TransferJson>(srv.url, vdi, image.length);
    for (const s of [CHUNK, 3 * CHUNK, 4 * CHUNK]) {
      assert.equal((await putChunk(srv.url, t, image, s, 'flush=n')).status, 200);
    }
    const res = await putChunk(srv.url, t, image, 6 * CHUNK, 'flush=y');
    const body = (await res.json()) as TransferJson;
    assert.deepEqual(body.received, [
      [CHUNK, 2 * CHUNK],
      [3 * CHUNK, 5 * CHUNK],
      [6 * CHUNK, 7 * CHUNK],
    ]);
    assert.equal(body.unflushed_bytes, 0);
    assert.deepEqual(storedReceived(srv.dataDir, t.id), body.received);
    await completeAndCheck(srv.url, vdi, t, image, body.received);
  });

  test('the group commit makes flush=n chunks durable without a flush request', async () => {
    const image = seededBytes(4 * CHUNK, 4);
    const vdi = (await createVdi(srv.url, image.length)).id;
    const t = await openUpload<TransferJson>(srv.url, vdi, image.length);
    for (let s = 0; s < image.length; s += CHUNK) {
      assert.equal((await putChunk(srv.url, t, image, s, 'flush=n')).status, 200);
    }
    const done = await waitFor(
      'the group commit',
      async () => {
        const now = await state(srv.url, t);
        return within([[0, image.length]], now.received) ? now : null;
      },
      { timeoutMs: 15_000 },
    );
    assert.equal(done.unflushed_bytes, 0);
    assert.deepEqual(done.received, [[0, image.length]]);
    assert.deepEqual(storedReceived(srv.dataDir, t.id), [[0, image.length]]);
    await completeAndCheck(srv.url, vdi, t, image, done.received);
  });

  test('finalize is a flush point: an upload sent entirely with flush=n commits byte-exact', async () => {
    const image = seededBytes(32 * CHUNK, 5);
    image.fill(0, 8 * CHUNK, 12 * CHUNK);
    const vdi = (await createVdi(srv.url, image.length)).id;
    const t = await openUpload<TransferJson>(srv.url, vdi, image.length);
    const order = [...Array(image.length / CHUNK).keys()].sort(() => prng(5)() - 0.5);
    for (const k of order)
      assert.equal((await putChunk(srv.url, t, image, k * CHUNK, 'flush=n')).status, 200);
    const fin = await api<Task>(srv.url, 'POST', `/v1/transfers/${t.id}/finalize?token=${t.token}&wait=60`);
    assert.equal(fin.body.status, 'success', JSON.stringify(fin.body));
    assert.equal(await sha256Url(`${srv.url}/v1/vdis/${vdi}/contents`), sha(image));
  });

  test('PATCH zero with "flush": false waits for the next flush point like a flush=n chunk', async () => {
    const image = seededBytes(4 * CHUNK, 6);
    image.fill(0, CHUNK, 3 * CHUNK);
    const vdi = (await createVdi(srv.url, image.length)).id;
    const t = await openUpload<TransferJson>(srv.url, vdi, image.length);
    const path_ = `/v1/transfers/${t.id}/data?token=${t.token}`;
    const zeroed = await api<TransferJson>(srv.url, 'PATCH', path_, {
      op: 'zero',
      offset: CHUNK,
      size: 2 * CHUNK,
      flush: false,
    });
    assert.equal(zeroed.status, 200, JSON.stringify(zeroed.body));
    // Unless the group commit already ran.
    if (zeroed.body.unflushed_bytes) assert.deepEqual(zeroed.body.received, []);
    const flushed = await flush(srv.url, t);
    assert.deepEqual(flushed.body.received, [[CHUNK, 3 * CHUNK]]);
    // ovirt-imageio's zero without offset starts at 0.
    const noSize = await api<{ error: { code: string } }>(srv.url, 'PATCH', path_, { op: 'zero' });
    assert.equal(noSize.status, 400);
    assert.equal(noSize.body.error.code, 'INVALID_REQUEST');
    await completeAndCheck(srv.url, vdi, t, image, flushed.body.received);
  });

  test('many chunk PUTs on one keep-alive connection leave no listener behind on its socket', async () => {
    const warnings: string[] = [];
    const onWarning = (w: Error) => warnings.push(`${w.name}: ${w.message}`);
    process.on('warning', onWarning);
    try {
      const image = seededBytes(32 * CHUNK, 8);
      const vdi = (await createVdi(srv.url, image.length)).id;
      const t = await openUpload<TransferJson>(srv.url, vdi, image.length);
      const { Client } = await import('undici');
      const client = new Client(srv.url); // one connection, reused by every request
      try {
        for (let s = 0; s < image.length; s += CHUNK) {
          const res = await client.request({
            method: 'PUT',
            path:
              new URL(dataUrl(srv.url, t, 'flush=n')).pathname +
              new URL(dataUrl(srv.url, t, 'flush=n')).search,
            headers: { 'content-range': `bytes ${s}-${s + CHUNK - 1}/${image.length}` },
            body: image.subarray(s, s + CHUNK),
          });
          assert.equal(res.statusCode, 200);
          await res.body.dump();
        }
      } finally {
        await client.close();
      }
      assert.equal((await flush(srv.url, t)).body.upload_offset, image.length);
      // A warning is emitted on the next tick of the listener that passed the limit.
      await new Promise((r) => setImmediate(r));
      assert.deepEqual(
        warnings.filter((w) => /MaxListeners/.test(w)),
        [],
      );
    } finally {
      process.off('warning', onWarning);
    }
  });

  test('a flush value that is neither y nor n is a 400 before any byte lands', async () => {
    const image = seededBytes(CHUNK, 7);
    const vdi = (await createVdi(srv.url, image.length)).id;
    const t = await openUpload<TransferJson>(srv.url, vdi, image.length);
    const res = await putChunk(srv.url, t, image, 0, 'flush=maybe');
    assert.equal(res.status, 400);
    const body = (await res.json()) as { error: { code: string; message: string } };
    assert.equal(body.error.code, 'INVALID_REQUEST');
    assert.match(body.error.message, /flush must be y or n/);
    assert.deepEqual((await state(srv.url, t)).received, []);
    assert.equal((await state(srv.url, t)).unflushed_bytes, 0);
    // A flush asked of a download session is refused as every write to it is.
    const down = await api<TransferJson>(srv.url, 'POST', '/v1/transfers', {
      vdi,
      direction: 'download',
      format: 'raw',
    });
    const refused = await flush(srv.url, down.body);
    assert.equal(refused.status, 409);
  });
});

describe('flush=n and kill -9 of a real server', () => {
  let dataDir: string;
  let server: ServerProcess;
  const SIZE = 4 * MiB;
  const rnd = prng(20261205);

  before(async () => {
    dataDir = await tempDir();
    server = await spawnServer(dataDir);
  });
  after(async () => {
    await server.stop();
    await fsp.rm(dataDir, { recursive: true, force: true });
  });

  async function kill9(): Promise<void> {
    await server.stop('SIGKILL');
    server = await spawnServer(dataDir);
  }

  test('flush=n chunks then kill -9: the resume offset never passes what was flushed, and the image ends byte-exact', async () => {
    const image = seededBytes(SIZE, 11);
    const vdi = (await createVdi(server.url, SIZE)).id;
    const t = await openUpload<TransferJson>(server.url, vdi, SIZE);
    const flushedEnd = 4 * CHUNK;
    for (let s = 0; s < flushedEnd; s += CHUNK)
      assert.equal((await putChunk(server.url, t, image, s)).status, 200);
    let sentEnd = flushedEnd;
    for (; sentEnd < 24 * CHUNK; sentEnd += CHUNK) {
      assert.equal((await putChunk(server.url, t, image, sentEnd, 'flush=n')).status, 200);
    }
    const last = await state(server.url, t);
    await kill9();
    const after = await state(server.url, t);
    assert.equal(after.state, 'open');
    assert.equal(after.unflushed_bytes, 0, 'a new process has nothing unflushed');
    // What the session claims after the crash: at least what it claimed before (it was durable),
    // at most what was sent (a group commit may have flushed some).
    assert.ok(within(last.received, after.received), `${JSON.stringify(after.received)} lost flushed bytes`);
    assert.ok(
      within(after.received, [[0, sentEnd]]),
      `${JSON.stringify(after.received)} claims bytes never sent`,
    );
    assert.ok(after.upload_offset >= flushedEnd && after.upload_offset <= sentEnd);
    assert.deepEqual(storedReceived(dataDir, t.id), after.received);
    await completeAndCheck(server.url, vdi, t, image, after.received);
  });

  test('flush=n chunks, a flush, kill -9: nothing the flush answered for is lost', async () => {
    const image = seededBytes(SIZE, 12);
    const vdi = (await createVdi(server.url, SIZE)).id;
    const t = await openUpload<TransferJson>(server.url, vdi, SIZE);
    for (let s = 0; s < 16 * CHUNK; s += CHUNK) {
      assert.equal((await putChunk(server.url, t, image, s, 'flush=n')).status, 200);
    }
    const flushed = await flush(server.url, t);
    assert.equal(flushed.status, 200);
    assert.deepEqual(flushed.body.received, [[0, 16 * CHUNK]]);
    for (let s = 40 * CHUNK; s < 48 * CHUNK; s += CHUNK) {
      assert.equal((await putChunk(server.url, t, image, s, 'flush=n')).status, 200);
    }
    await kill9();
    const after = await state(server.url, t);
    assert.ok(
      within([[0, 16 * CHUNK]], after.received),
      `flushed bytes lost: ${JSON.stringify(after.received)}`,
    );
    assert.ok(
      within(after.received, [
        [0, 16 * CHUNK],
        [40 * CHUNK, 48 * CHUNK],
      ]),
    );
    await completeAndCheck(server.url, vdi, t, image, after.received);
  });

  test('a qcow2 upload converting into a raw VDI as it arrives, sent with flush=n, survives kill -9 byte-exact', async () => {
    const disk = seededBytes(SIZE, 13);
    disk.fill(0, MiB, 2 * MiB);
    const rawFile = path.join(dataDir, 'q.raw');
    await fsp.writeFile(rawFile, disk);
    await execFileP('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', rawFile, `${rawFile}.qcow2`]);
    const image = await fsp.readFile(`${rawFile}.qcow2`);
    const vdi = (await createVdi(server.url, SIZE)).id;
    const t = await openUpload<TransferJson>(server.url, vdi, image.length, 'qcow2');
    // In order (streamed into the disk, flushed whatever flush says), then one out of order (staged, deferred).
    const half = Math.floor(image.length / CHUNK / 2) * CHUNK;
    for (let s = 0; s < half; s += CHUNK) {
      assert.equal((await putChunk(server.url, t, image, s, 'flush=n')).status, 200);
    }
    const last = Math.floor((image.length - 1) / CHUNK) * CHUNK;
    assert.equal((await putChunk(server.url, t, image, last, 'flush=n')).status, 200);
    const before = await state(server.url, t);
    assert.ok(within([[0, half]], before.received), 'streamed chunks were flushed at their end');
    await kill9();
    const after = await state(server.url, t);
    assert.ok(within(before.received, after.received));
    assert.ok(
      within(after.received, [
        [0, half],
        [last, image.length],
      ]),
    );
    await completeAndCheck(server.url, vdi, t, image, after.received, disk);
  });

  test('kills at random moments of parallel flush=n uploads with flushes: a resume never skips a byte', async () => {
    const vdi = (await createVdi(server.url, SIZE)).id;
    for (let round = 0; round < 4; round++) {
      const image = seededBytes(SIZE, 100 + round);
      image.fill(0, MiB, MiB + 8 * CHUNK);
      const t = await openUpload<TransferJson>(server.url, vdi, SIZE);
      const chunks = [...Array(SIZE / CHUNK).keys()].sort(() => rnd() - 0.5);
      // What the last answered flush vouched for, and every chunk whose request went out.
      let vouched: Range[] = [];
      const started: Range[] = [];
      const base = server.url;
      let stop = false;
      const sender = async (lane: number) => {
        for (let i = lane; i < chunks.length && !stop; i += 4) {
          const s = chunks[i] * CHUNK;
          started.push([s, s + CHUNK]);
          const res = await putChunk(base, t, image, s, 'flush=n');
          await res.arrayBuffer();
          if (i % 16 === lane) {
            const f = await flush(base, t);
            if (f.status === 200) vouched = f.body.received;
          }
        }
      };
      const sending = Promise.all([0, 1, 2, 3].map((l) => sender(l).catch(() => {})));
      await sleep(30 + Math.floor(rnd() * 300));
      stop = true;
      await kill9();
      await sending;
      const after = await state(server.url, t);
      assert.ok(within(vouched, after.received), `round ${round}: a flushed range was lost`);
      assert.ok(within(after.received, merge(started)), `round ${round}: bytes claimed that were never sent`);
      await completeAndCheck(server.url, vdi, t, image, after.received);
    }
  });
});

describe('flush=n saves the per-chunk fdatasync (counted by strace on a real server)', {
  skip: existsSync('/usr/bin/strace') ? false : 'strace is not installed',
}, () => {
  let dataDir: string;
  let server: ServerProcess;
  before(async () => {
    dataDir = await tempDir();
    server = await spawnServer(dataDir);
  });
  after(async () => {
    await server.stop();
    await fsp.rm(dataDir, { recursive: true, force: true });
  });

  /** Runs `work` under strace attached to the server; returns the fsync and fdatasync calls it made. */
  async function syncsDuring(work: () => Promise<void>): Promise<number> {
    return (await syncedFilesDuring(work)).length;
  }

  /** The file of each fsync and fdatasync the server made while `work` ran, in order. */
  async function syncedFilesDuring(work: () => Promise<void>): Promise<string[]> {
    const out = path.join(dataDir, `strace-${Date.now()}.txt`);
    const strace: ChildProcess = spawn(
      'strace',
      // -y: each descriptor with its path.
      ['-f', '-y', '-e', 'trace=fsync,fdatasync', '-o', out, '-p', String(server.child.pid)],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    let err = '';
    strace.stderr?.on('data', (d) => {
      err += d;
    });
    await waitFor('strace to attach', () => /attached/.test(err) || strace.exitCode !== null, {
      timeoutMs: 20_000,
    });
    assert.equal(strace.exitCode, null, `strace could not attach: ${err}`);
    await work();
    const exited = new Promise((r) => strace.once('exit', r));
    strace.kill('SIGINT');
    await exited;
    const lines = (await fsp.readFile(out, 'utf8')).split('\n');
    return lines.flatMap((l) => {
      const m = /\b(?:fsync|fdatasync)\(\d+<([^>]*)>/.exec(l);
      return m ? [m[1]] : [];
    });
  }

  test('64 chunks: flush=n costs one flush, flush=y at least one fdatasync each', async () => {
    const n = 64;
    const image = seededBytes(2 * n * CHUNK, 21);
    const vdi = (await createVdi(server.url, image.length)).id;
    const t = await openUpload<TransferJson>(server.url, vdi, image.length);
    const deferred = await syncsDuring(async () => {
      for (let k = 0; k < n; k++) {
        assert.equal((await putChunk(server.url, t, image, k * CHUNK, 'flush=n')).status, 200);
      }
      assert.equal((await flush(server.url, t)).status, 200);
    });
    const flushed = await syncsDuring(async () => {
      for (let k = n; k < 2 * n; k++)
        assert.equal((await putChunk(server.url, t, image, k * CHUNK)).status, 200);
    });
    assert.ok(flushed >= n, `flush=y: ${flushed} syncs for ${n} chunks`);
    // The flush's two (staging file, database) and a group commit or two on a slow machine.
    assert.ok(deferred <= 8, `flush=n: ${deferred} syncs for ${n} chunks`);
    await completeAndCheck(server.url, vdi, t, image, [[0, image.length]]);
  });

  test('a flush point syncs the staging file once and commits the database once', async () => {
    // Each flush=y chunk is a flush point: its bytes' fdatasync, then the session's
    // ranges and its task's progress saved in one transaction (one journal sync).
    const n = 16;
    const image = seededBytes(n * CHUNK, 22);
    const vdi = (await createVdi(server.url, image.length)).id;
    const t = await openUpload<TransferJson>(server.url, vdi, image.length);
    const files = await syncedFilesDuring(async () => {
      for (let k = 0; k < n; k++) assert.equal((await putChunk(server.url, t, image, k * CHUNK)).status, 200);
    });
    const staging = files.filter((f) => f.includes('staging') || f.includes(t.id));
    const database = files.filter((f) => /\.(db|sqlite)(-wal|-journal)?$/.test(f));
    assert.ok(
      staging.length >= n,
      `${staging.length} syncs of the staging file for ${n} chunks: ${files.join(', ')}`,
    );
    // Two per flush point before (the session's row and the task's, each its own commit).
    assert.ok(
      database.length <= staging.length + 2,
      `${database.length} database syncs for ${staging.length} of the staging file: ${files.join(', ')}`,
    );
    await completeAndCheck(server.url, vdi, t, image, [[0, image.length]]);
  });
});
