/**
 * Incremental replication: `POST /v1/vdis/{id}/push {target, incremental: true}`
 * between two diskports over real sockets (the sender its own process, so
 * it can be killed). The first push is full and sends only the data; each
 * later one sends only the changed blocks, as a delta over the snapshot
 * the receiver made at the last commit; the target ends equal to the source
 * by sha256 every round, one snapshot per pair stays on each side. A target
 * changed behind the pushes' back makes the next push full, said in its
 * result; a kill -9 of the sender mid-push resumes after its restart; bad
 * requests get the registry's errors.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { promises as fsp } from 'node:fs';
import http from 'node:http';
import type net from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { api, createVdi } from './helpers/api.js';
import { sample, scrape } from './helpers/metrics.js';
import {
  type ServerProcess,
  seededBytes,
  spawnServer,
  startServer,
  type TestServer,
  tempDir,
} from './helpers/server.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 64 * MiB;
const BLOCK = 64 * KiB;
const TOKEN = 'receiver-management-token';
const AUTH = { authorization: `Bearer ${TOKEN}` };

type Task = {
  id: string;
  status: string;
  error: { code: string; message: string } | null;
  result: Record<string, unknown> | null;
};
type ErrorBody = { error: { code: string; message: string } };
type Vdi = { id: string; is_snapshot: boolean; snapshot_of: string | null };

/** Bytes of the 64 KiB blocks that differ between two disks. */
function changedBlockBytes(a: Buffer, b: Buffer): number {
  let n = 0;
  for (let at = 0; at < a.length; at += BLOCK) {
    if (!a.subarray(at, at + BLOCK).equals(b.subarray(at, at + BLOCK))) n += BLOCK;
  }
  return n;
}

/**
 * An HTTP proxy in front of `target` that can hold every chunk PUT (a link
 * gone silent) until released, a held request whose client went away being
 * dropped; or cut the connection of the PUT that carries the `cutAt`-th
 * byte of data, once. `putBytes` counts the data PUTs' body bytes it carried;
 * `requests` lists every request it passed on (method and path, ids as `{id}`).
 */
async function holdingProxy(target: URL) {
  const state = {
    hold: false,
    held: [] as (() => void)[],
    cutAt: Number.POSITIVE_INFINITY,
    cuts: 0,
    putBytes: 0,
    requests: [] as string[],
  };
  const server = http.createServer((req, res) => {
    const isData = req.method === 'PUT' && /\/data\?/.test(req.url ?? '');
    const route = (req.url ?? '').replace(/\?.*/, '').replace(/[0-9a-f]{8}-[0-9a-f-]{27}/g, '{id}');
    state.requests.push(`${req.method} ${route}`);
    const go = () => {
      if (req.destroyed) return;
      const up = http.request(
        { host: target.hostname, port: target.port, method: req.method, path: req.url, headers: req.headers },
        (answer) => {
          res.writeHead(answer.statusCode ?? 502, answer.headers);
          answer.pipe(res);
        },
      );
      up.on('error', () => res.destroy());
      if (!isData) {
        req.pipe(up);
        return;
      }
      req.on('data', (chunk: Buffer) => {
        state.putBytes += chunk.length;
        if (state.putBytes >= state.cutAt) {
          // The link breaks mid-body: both sides see the connection go.
          state.cutAt = Number.POSITIVE_INFINITY;
          state.cuts++;
          up.destroy();
          req.socket.destroy();
          return;
        }
        if (!up.write(chunk)) {
          req.pause();
          up.once('drain', () => req.resume());
        }
      });
      req.on('end', () => up.end());
    };
    if (state.hold && isData) state.held.push(go);
    else go();
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    state,
    url: `http://127.0.0.1:${(server.address() as net.AddressInfo).port}`,
    release() {
      state.hold = false;
      for (const go of state.held.splice(0)) go();
    },
    close() {
      server.closeAllConnections();
      return new Promise((r) => server.close(r));
    },
  };
}

describe('incremental push: only what changed crosses the wire', () => {
  let dir: string;
  let a: ServerProcess;
  let b: TestServer;
  before(async () => {
    dir = await tempDir();
    a = await spawnServer(path.join(dir, 'a'), ['--allow-fetch', '127.0.0.0/8']);
    b = await startServer({ dataDir: path.join(dir, 'b'), token: TOKEN });
  });
  after(async () => {
    await a?.stop();
    await b?.close();
    await fsp.rm(dir, { recursive: true, force: true });
  });

  const waitTask = async (id: string) => {
    for (let i = 0; ; i++) {
      const res = await api<Task>(a.url, 'GET', `/v1/tasks/${id}?wait=5`);
      if (!['pending', 'running'].includes(res.body.status)) return res.body;
      assert.ok(i < 24, `task still running after two minutes: ${JSON.stringify(res.body)}`);
    }
  };
  const checksum = async (base: string, vdi: string, headers: Record<string, string> = {}) => {
    const res = await api<{ checksum: string }>(
      base,
      'GET',
      `/v1/vdis/${vdi}/checksum?algorithm=sha256&async=false`,
      undefined,
      headers,
    );
    assert.equal(res.status, 200, JSON.stringify(res.body));
    return res.body.checksum;
  };
  const putDisk = async (base: string, vdi: string, disk: Buffer, headers: Record<string, string> = {}) => {
    const res = await fetch(`${base}/v1/vdis/${vdi}/contents?format=raw`, {
      method: 'PUT',
      headers,
      body: new Uint8Array(disk),
    });
    assert.equal(res.status, 200, await res.text());
  };
  const snapshotsOf = async (base: string, vdi: string, headers: Record<string, string> = {}) => {
    const res = await api<Vdi[]>(base, 'GET', `/v1/vdis/${vdi}/snapshots`, undefined, headers);
    assert.equal(res.status, 200);
    return res.body.map((v) => v.id).sort();
  };
  const startPush = async (source: string, target: string, server = b.url) => {
    const res = await api<Task>(a.url, 'POST', `/v1/vdis/${source}/push`, {
      target: { server, vdi: target, token: TOKEN },
      incremental: true,
    });
    assert.equal(res.status, 202, JSON.stringify(res.body));
    assert.equal(res.headers.get('location'), `/v1/tasks/${res.body.id}`);
    return res.body;
  };
  const push = async (source: string, target: string) => {
    const task = await waitTask((await startPush(source, target)).id);
    assert.equal(task.status, 'success', JSON.stringify(task));
    return task.result as Record<string, unknown> & { bytes_sent: number; remote_transfer: string };
  };
  /** What the receiving session of a push received, by its own count. */
  const received = async (remoteTransfer: string) => {
    const res = await api<{ bytes_received: number; state: string; snapshot: string | null }>(
      b.url,
      'GET',
      `/v1/transfers/${remoteTransfer}`,
      undefined,
      AUTH,
    );
    assert.equal(res.body.state, 'committed');
    return res.body;
  };

  /** What the receiver's delta commits read of the content they were laid onto (/metrics). */
  const baseBytesRead = async () => {
    const n = sample(await scrape(b.url, AUTH), 'diskport_delta_base_bytes_read_total');
    assert.ok(n !== undefined, 'the receiver reports the metric');
    return n;
  };

  /** 13 MiB of data in a 64 MiB disk, the rest holes. */
  function initialDisk(): Buffer {
    const disk = Buffer.alloc(SIZE);
    seededBytes(4 * MiB, 1).copy(disk, 0);
    seededBytes(6 * MiB, 2).copy(disk, 40 * MiB);
    seededBytes(3 * MiB, 3).copy(disk, 52 * MiB + BLOCK);
    return disk;
  }

  /** A source VDI on the sender holding `initialDisk()`, and an empty target of its size on the receiver. */
  const sourceAndTarget = async (label = 'replica') => {
    const disk = initialDisk();
    const source = (await createVdi(a.url, SIZE)).id;
    await putDisk(a.url, source, disk);
    const target = (
      await api<Vdi>(b.url, 'POST', '/v1/vdis', { name_label: label, virtual_size: SIZE }, AUTH)
    ).body.id;
    return { disk, source, target };
  };
  const assertTargetEqualsSource = async (source: string, target: string, what?: string) =>
    assert.equal(await checksum(b.url, target, AUTH), await checksum(a.url, source), what);
  /** Each side keeps exactly its snapshot of the pair `result` names (none without one). */
  const assertPairKept = async (source: string, target: string, result: Record<string, unknown> | null) => {
    assert.deepEqual(await snapshotsOf(a.url, source), result ? [result.source_snapshot] : []);
    assert.deepEqual(await snapshotsOf(b.url, target, AUTH), result ? [result.target_snapshot] : []);
  };

  test('full first, then only the changed blocks, three rounds: the target equals the source each time, one snapshot per side', async (t) => {
    const { disk, source, target } = await sourceAndTarget();

    const first = await push(source, target);
    t.diagnostic(`the first push sent ${first.bytes_sent} bytes for 13 MiB of data`);
    assert.equal(first.incremental, true);
    assert.equal(first.mode, 'full');
    assert.equal(first.fallback, null);
    // Holes never cross the wire: only the 13 MiB of data does.
    assert.ok(
      first.bytes_sent <= 13 * MiB,
      `the full push sent ${first.bytes_sent} bytes for 13 MiB of data`,
    );
    assert.equal((await received(first.remote_transfer)).bytes_received >= first.bytes_sent, true);
    await assertTargetEqualsSource(source, target);
    await assertPairKept(source, target, first);
    assert.equal((await received(first.remote_transfer)).snapshot, first.target_snapshot);

    const rounds: [string, (d: Buffer) => void][] = [
      [
        'data over data, zeros over data, data in a hole',
        (d) => {
          seededBytes(300 * KiB, 10).copy(d, MiB + 4 * KiB);
          d.fill(0, 41 * MiB, 41 * MiB + 128 * KiB);
          seededBytes(192 * KiB, 11).copy(d, 20 * MiB + BLOCK);
        },
      ],
      [
        'a MiB in a hole, a block of data, 8 KiB inside a block',
        (d) => {
          seededBytes(MiB, 12).copy(d, 60 * MiB);
          seededBytes(BLOCK, 13).copy(d, 2 * MiB);
          seededBytes(8 * KiB, 14).copy(d, 52 * MiB + 100 * KiB);
        },
      ],
    ];
    let previous = first;
    for (const [what, write] of rounds) {
      const before = Buffer.from(disk);
      write(disk);
      await putDisk(a.url, source, disk);
      const changed = changedBlockBytes(before, disk);
      const readBefore = await baseBytesRead();
      const r = await push(source, target);
      // The receiver's commit lays the delta's blocks onto its snapshot's content
      // without reading that content (the delta holds whole 64 KiB blocks).
      const read = (await baseBytesRead()) - readBefore;
      assert.ok(read <= changed, `${what}: the receiver's commit read ${read} bytes of the target`);
      t.diagnostic(`${what}: ${r.bytes_sent} bytes sent for ${changed} bytes of changed blocks`);
      assert.equal(r.mode, 'delta', `${what}: ${JSON.stringify(r)}`);
      assert.equal(r.base, previous.source_snapshot);
      assert.equal(r.target_base, previous.target_snapshot);
      // The changed blocks and the delta's own tables, nothing of the 13 MiB that stayed.
      assert.ok(
        r.bytes_sent <= changed + 512 * KiB,
        `${what}: ${r.bytes_sent} bytes sent for ${changed} bytes of changed blocks`,
      );
      assert.equal((await received(r.remote_transfer)).bytes_received, r.bytes_sent);
      await assertTargetEqualsSource(source, target, what);
      // The previous pair is retired on both sides.
      await assertPairKept(source, target, r);
      assert.equal((await api(a.url, 'GET', `/v1/vdis/${previous.source_snapshot}`)).status, 404);
      previous = r;
    }

    // Nothing changed: the delta is the tables alone.
    const idle = await push(source, target);
    t.diagnostic(`no change: ${idle.bytes_sent} bytes sent`);
    assert.equal(idle.mode, 'delta');
    assert.ok(idle.bytes_sent <= 512 * KiB, `${idle.bytes_sent} bytes sent for no change`);
    await assertTargetEqualsSource(source, target);
  });

  test('a target changed behind the pushes falls back to a full push, said in the result; the next one is a delta again', async () => {
    const { disk, source, target } = await sourceAndTarget();
    const first = await push(source, target);
    assert.equal(first.mode, 'full');

    const meddled = Buffer.from(disk);
    meddled.fill(0x5a, 30 * MiB, 30 * MiB + 4 * KiB);
    await putDisk(b.url, target, meddled, AUTH);
    seededBytes(BLOCK, 20).copy(disk, 8 * MiB);
    await putDisk(a.url, source, disk);

    const r = await push(source, target);
    assert.equal(r.mode, 'full', JSON.stringify(r));
    assert.match(String(r.fallback), /changed since snapshot/);
    assert.match(String(r.fallback), new RegExp(String(first.target_snapshot)));
    await assertTargetEqualsSource(source, target);
    assert.deepEqual(await snapshotsOf(b.url, target, AUTH), [r.target_snapshot]);

    // The source's snapshot of the pair deleted by hand: full again, and said so.
    await api(a.url, 'DELETE', `/v1/vdis/${r.source_snapshot}`);
    const gone = await push(source, target);
    assert.equal(gone.mode, 'full');
    assert.match(String(gone.fallback), /is gone/);

    seededBytes(BLOCK, 21).copy(disk, 9 * MiB);
    await putDisk(a.url, source, disk);
    const next = await push(source, target);
    assert.equal(next.mode, 'delta');
    assert.equal(next.fallback, null);
    await assertTargetEqualsSource(source, target);
  });

  test('without incremental: the live VDI is pushed whole, data only, and no snapshot is kept on either side', async () => {
    const { source, target } = await sourceAndTarget('copy');
    const res = await api<Task>(a.url, 'POST', `/v1/vdis/${source}/push`, {
      target: { server: b.url, vdi: target, token: TOKEN },
    });
    assert.equal(res.status, 202, JSON.stringify(res.body));
    const task = await waitTask(res.body.id);
    assert.equal(task.status, 'success', JSON.stringify(task));
    assert.equal(task.result?.incremental, false);
    assert.ok((task.result?.bytes_sent as number) <= 13 * MiB);
    await assertTargetEqualsSource(source, target);
    await assertPairKept(source, target, null);
  });

  test('a kill -9 of the sender mid-delta resumes after its restart; a second push meanwhile is 409 PUSH_IN_PROGRESS', async () => {
    const proxy = await holdingProxy(new URL(b.url));
    try {
      const { disk, source, target } = await sourceAndTarget();
      const first = await waitTask((await startPush(source, target, proxy.url)).id);
      assert.equal(first.status, 'success', JSON.stringify(first));

      seededBytes(2 * MiB, 30).copy(disk, 16 * MiB);
      await putDisk(a.url, source, disk);
      proxy.state.hold = true;
      const started = await startPush(source, target, proxy.url);
      while (proxy.state.held.length === 0) await new Promise((r) => setTimeout(r, 20));
      const again = await api<ErrorBody>(a.url, 'POST', `/v1/vdis/${source}/push`, {
        target: { server: proxy.url, vdi: target, token: TOKEN },
        incremental: true,
      });
      assert.equal(again.status, 409);
      assert.equal(again.body.error.code, 'PUSH_IN_PROGRESS');

      await a.stop('SIGKILL');
      proxy.release();
      a = await spawnServer(path.join(dir, 'a'), ['--allow-fetch', '127.0.0.0/8']);
      const task = await waitTask(started.id);
      assert.equal(task.status, 'success', JSON.stringify(task));
      assert.equal(task.result?.mode, 'delta');
      await assertTargetEqualsSource(source, target);
      await assertPairKept(source, target, task.result);

      // A push cancelled mid-way: the receiver's session is cancelled (the target is free), the
      // pair stays, and the next push is a delta over it that deletes the cancelled one's snapshot.
      seededBytes(MiB, 31).copy(disk, 24 * MiB);
      await putDisk(a.url, source, disk);
      proxy.state.hold = true;
      const cancelled = await startPush(source, target, proxy.url);
      while (proxy.state.held.length === 0) await new Promise((r) => setTimeout(r, 20));
      assert.equal((await api(a.url, 'POST', `/v1/tasks/${cancelled.id}/cancel`)).status, 202);
      proxy.release();
      assert.equal((await waitTask(cancelled.id)).status, 'cancelled');
      // The task ends as the cancel is asked; the push's job then cancels the receiver's session.
      for (let i = 0; ; i++) {
        const open = await api<unknown[]>(
          b.url,
          'GET',
          `/v1/transfers?vdi=${target}&active=true`,
          undefined,
          AUTH,
        );
        if (open.body.length === 0) break;
        assert.ok(i < 600, "the receiver's session was never cancelled");
        await new Promise((r) => setTimeout(r, 50));
      }
      const next = await waitTask((await startPush(source, target, proxy.url)).id);
      assert.equal(next.status, 'success', JSON.stringify(next));
      assert.equal(next.result?.mode, 'delta');
      assert.equal(next.result?.base, task.result?.source_snapshot);
      await assertTargetEqualsSource(source, target);
      await assertPairKept(source, target, next.result);
    } finally {
      await proxy.close();
    }
  });

  test('a delta streamed in one request and cut part way resumes from what the receiver kept: only the rest is sent again, byte-exact', async () => {
    const proxy = await holdingProxy(new URL(b.url));
    try {
      const { disk, source, target } = await sourceAndTarget();
      const first = await waitTask((await startPush(source, target, proxy.url)).id);
      assert.equal(first.status, 'success', JSON.stringify(first));

      // 12 MiB of new data in four places, over data and in holes.
      for (const [at, seed] of [
        [2 * MiB, 40],
        [20 * MiB, 41],
        [41 * MiB + BLOCK, 42],
        [58 * MiB, 43],
      ]) {
        seededBytes(3 * MiB, seed).copy(disk, at);
      }
      await putDisk(a.url, source, disk);
      proxy.state.putBytes = 0;
      proxy.state.cutAt = 5 * MiB;
      const task = await waitTask((await startPush(source, target, proxy.url)).id);
      assert.equal(task.status, 'success', JSON.stringify(task));
      const r = task.result as Record<string, unknown> & { bytes_sent: number; retries: number };
      assert.equal(r.mode, 'delta', JSON.stringify(r));
      assert.equal(proxy.state.cuts, 1, 'the proxy cut the delta once');
      assert.ok(r.retries >= 1, JSON.stringify(r));
      // The first request carried over 5 MiB before the cut; what it delivered was kept.
      const delta = 12 * MiB + 512 * KiB;
      assert.ok(
        proxy.state.putBytes < delta + 2 * MiB,
        `${(proxy.state.putBytes / MiB).toFixed(1)} MiB of PUT bodies crossed for a delta of about 12 MiB`,
      );
      assert.ok(r.bytes_sent < 10 * MiB, `the request after the cut sent ${r.bytes_sent} bytes`);
      await assertTargetEqualsSource(source, target);
      await assertPairKept(source, target, r);

      // The next push is a delta over the resumed one's pair.
      seededBytes(BLOCK, 44).copy(disk, 30 * MiB);
      await putDisk(a.url, source, disk);
      const next = await waitTask((await startPush(source, target, proxy.url)).id);
      assert.equal(next.status, 'success', JSON.stringify(next));
      assert.equal(next.result?.mode, 'delta');
      assert.equal(next.result?.base, r.source_snapshot);
      await assertTargetEqualsSource(source, target);
    } finally {
      await proxy.close();
    }
  });

  test("a delta push asks its receiver nothing it already knows: one request per step, the session's state never", async () => {
    const proxy = await holdingProxy(new URL(b.url));
    try {
      const { disk, source, target } = await sourceAndTarget();
      const first = await waitTask((await startPush(source, target, proxy.url)).id);
      assert.equal(first.status, 'success', JSON.stringify(first));
      seededBytes(2 * MiB, 50).copy(disk, 8 * MiB);
      await putDisk(a.url, source, disk);

      proxy.state.requests = [];
      const task = await waitTask((await startPush(source, target, proxy.url)).id);
      assert.equal(task.status, 'success', JSON.stringify(task));
      assert.equal(task.result?.mode, 'delta', JSON.stringify(task.result));
      // The session it opened is empty: sent to at once. Its commit's task names the
      // receiver's new snapshot: kept as the pair's without asking. The previous pair's
      // snapshot on the receiver is deleted (the source's at the same time).
      assert.deepEqual(proxy.state.requests, [
        'GET /v1/vdis/{id}',
        'POST /v1/transfers',
        'PUT /v1/transfers/{id}/data',
        'POST /v1/transfers/{id}/finalize',
        'DELETE /v1/vdis/{id}',
      ]);
      const r = task.result as Record<string, unknown>;
      assert.equal((await received(r.remote_transfer as string)).snapshot, r.target_snapshot);
      await assertTargetEqualsSource(source, target);
      await assertPairKept(source, target, r);
      assert.equal(
        (await api(b.url, 'GET', `/v1/vdis/${first.result?.target_snapshot}`, undefined, AUTH)).status,
        404,
      );
    } finally {
      await proxy.close();
    }
  });

  test('bad requests: the registry says what is wrong', async () => {
    const source = (await createVdi(a.url, SIZE)).id;
    const target = (await api<Vdi>(b.url, 'POST', '/v1/vdis', { name_label: 'r', virtual_size: SIZE }, AUTH))
      .body.id;
    const pushWith = (body: unknown, vdi = source) =>
      api<ErrorBody>(a.url, 'POST', `/v1/vdis/${vdi}/push`, body);

    const unknown = await pushWith({
      target: { server: b.url, vdi: '00000000-0000-0000-0000-000000000000', token: TOKEN },
      incremental: true,
    });
    assert.equal(unknown.status, 404);
    assert.equal(unknown.body.error.code, 'REMOTE_VDI_NOT_FOUND');

    const noToken = await pushWith({ target: { server: b.url, vdi: target }, incremental: true });
    assert.equal(noToken.status, 502);
    assert.equal(noToken.body.error.code, 'REMOTE_REJECTED');
    assert.match(noToken.body.error.message, /target\.token/);

    const smaller = (await api<Vdi>(b.url, 'POST', '/v1/vdis', { name_label: 's', virtual_size: MiB }, AUTH))
      .body.id;
    const size = await pushWith({ target: { server: b.url, vdi: smaller, token: TOKEN }, incremental: true });
    assert.equal(size.status, 409);
    assert.equal(size.body.error.code, 'CONFLICTING_LENGTH');

    const notUrl = await pushWith({ target: { server: 'not a url', vdi: target }, incremental: true });
    assert.equal(notUrl.status, 400);
    assert.equal(notUrl.body.error.code, 'INVALID_URL');

    const noTarget = await pushWith({ incremental: true });
    assert.equal(noTarget.status, 400);
    assert.equal(noTarget.body.error.code, 'INVALID_REQUEST');

    const snap = (await api<Vdi>(a.url, 'POST', `/v1/vdis/${source}/snapshots`, {})).body.id;
    const ofSnapshot = await pushWith(
      { target: { server: b.url, vdi: target, token: TOKEN }, incremental: true },
      snap,
    );
    assert.equal(ofSnapshot.status, 409);
    assert.equal(ofSnapshot.body.error.code, 'VDI_IS_SNAPSHOT');

    const missing = await pushWith(
      { target: { server: b.url, vdi: target, token: TOKEN }, incremental: true },
      '00000000-0000-0000-0000-000000000000',
    );
    assert.equal(missing.status, 404);
    assert.equal(missing.body.error.code, 'VDI_NOT_FOUND');

    // The receiver itself, without --allow-fetch, may not push to a loopback address.
    const forbidden = await api<ErrorBody>(
      b.url,
      'POST',
      `/v1/vdis/${target}/push`,
      { target: { server: a.url, vdi: source } },
      AUTH,
    );
    assert.equal(forbidden.status, 400);
    assert.equal(forbidden.body.error.code, 'FETCH_TARGET_FORBIDDEN');

    // snapshot_after_commit belongs to uploads.
    const download = await api<ErrorBody>(
      b.url,
      'POST',
      '/v1/transfers',
      {
        vdi: target,
        direction: 'download',
        snapshot_after_commit: true,
      },
      AUTH,
    );
    assert.equal(download.status, 400);
    assert.equal(download.body.error.code, 'INVALID_REQUEST');

    // Nothing was left behind by the refused pushes.
    assert.deepEqual(await snapshotsOf(a.url, source), [snap]);
  });
});
