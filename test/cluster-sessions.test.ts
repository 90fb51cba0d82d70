/**
 * Three nodes over one PostgreSQL database and one data directory, behind a
 * round-robin balancer without affinity: the requests of one transfer
 * session, tus upload or imageio ticket land on every node and are
 * forwarded to the node holding the session; when that node is killed -9,
 * another takes its sessions, its finalize, its pull and its push over within
 * --node-timeout and a heartbeat, and every result is byte-exact.
 * PostgreSQL only: on SQLite a data directory is one process's.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import { promises as fsp } from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import * as tus from 'tus-js-client';
import { api, createVdi, execFileP, openUpload, sha256Url, type TransferJson } from './helpers/api.js';
import * as imageio from './helpers/imageio-client.js';
import { execSqlAt, TEST_DATABASE_URL } from './helpers/pg.js';
import { cutProxy } from './helpers/proxy.js';
import { type RoundRobin, roundRobin } from './helpers/round-robin.js';
import { type ServerProcess, seededBytes, spawnServer, tempDir } from './helpers/server.js';
import { waitFor } from './helpers/wait.js';

const MiB = 1024 * 1024;
const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');
const skip = TEST_DATABASE_URL ? false : 'several nodes need PostgreSQL (run with scripts/test-postgres.sh)';
const NODE_TIMEOUT_MS = 1500;
const ARGS = [
  '--heartbeat',
  '200ms',
  '--node-timeout',
  `${NODE_TIMEOUT_MS}ms`,
  '--allow-fetch',
  '127.0.0.0/8',
];
/** How soon a dead node's work must be taken over: its timeout, heartbeats, and a loaded machine's slack. */
const TAKEOVER_BOUND_MS = NODE_TIMEOUT_MS + 10_000;

type Task = { id: string; status: string; error?: { code: string } | null };
type ErrorBody = { error: { code: string; message: string } };

/** Fisher-Yates with a fixed seed: the same shuffled order every run. */
function shuffled<T>(items: T[], seed: number): T[] {
  const out = [...items];
  let x = seed;
  for (let i = out.length - 1; i > 0; i--) {
    x = (x * 1103515245 + 12345) % 2 ** 31;
    const j = x % (i + 1);
    [out[i], out[j]] = [out[j], out[i]];
  }
  return out;
}

function putChunk(base: string, t: TransferJson, data: Buffer, start: number, total: number) {
  return fetch(`${base}/v1/transfers/${t.id}/data?token=${t.token}`, {
    method: 'PUT',
    headers: { 'content-range': `bytes ${start}-${start + data.length - 1}/${total}` },
    body: new Uint8Array(data),
  });
}

/** Sends until accepted: while the holder is dead and not yet taken over, 503 NODE_UNREACHABLE says retry. */
async function putChunkRetrying(base: string, t: TransferJson, data: Buffer, start: number, total: number) {
  const deadline = Date.now() + TAKEOVER_BOUND_MS;
  for (;;) {
    const res = await putChunk(base, t, data, start, total);
    if (res.status < 300) return;
    const body = await res.text();
    assert.equal(res.status, 503, body);
    assert.equal((JSON.parse(body) as ErrorBody).error.code, 'NODE_UNREACHABLE');
    assert.ok(Number(res.headers.get('retry-after')) > 0);
    assert.ok(Date.now() < deadline, `not taken over within ${TAKEOVER_BOUND_MS} ms`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

const waitTask = async (base: string, id: string): Promise<Task> =>
  waitFor(
    `task ${id} to end`,
    async () => {
      const res = await api<Task>(base, 'GET', `/v1/tasks/${id}?wait=5`);
      return ['pending', 'running'].includes(res.body.status) ? null : res.body;
    },
    { timeoutMs: 90_000 },
  );

describe('one session across three nodes', { skip }, () => {
  const dirs: string[] = [];
  const servers: ServerProcess[] = [];
  const balancers: RoundRobin[] = [];
  after(async () => {
    for (const b of balancers) await b.close();
    for (const s of servers) await s.stop('SIGKILL');
    for (const d of dirs) await fsp.rm(d, { recursive: true, force: true });
  });
  const cluster = async () => {
    const dataDir = await tempDir();
    dirs.push(dataDir);
    const nodes: ServerProcess[] = [];
    for (let i = 0; i < 3; i++) nodes.push(await spawnServer(dataDir, ARGS));
    servers.push(...nodes);
    const lb = await roundRobin(nodes.map((n) => n.url));
    balancers.push(lb);
    return { dataDir, nodes, lb };
  };
  /** The node whose task runs the session, by its URL. */
  const holderOf = async (base: string, transfer: string, nodes: ServerProcess[]) => {
    const list = await api<{ id: string; address: string }[]>(base, 'GET', '/v1/nodes');
    const t = await api<TransferJson>(base, 'GET', `/v1/transfers/${transfer}`);
    const task = await api<{ node?: string }>(base, 'GET', `/v1/tasks/${t.body.task_id}`);
    const address = list.body.find((n) => n.id === task.body.node)?.address;
    return nodes.find((n) => n.url === address);
  };

  test('the chunks of one upload arrive at every node in any order; progress and finalize at any node', async () => {
    const { nodes, lb } = await cluster();
    const size = 24 * MiB;
    const data = seededBytes(size, 501);
    const vdi = await createVdi(lb.url, size);
    const t = await openUpload<TransferJson>(lb.url, vdi.id, size);
    const starts = shuffled(
      Array.from({ length: size / MiB }, (_, i) => i * MiB),
      7,
    );
    const before = lb.sentTo.length;
    for (const start of starts) {
      const res = await putChunk(lb.url, t, data.subarray(start, start + MiB), start, size);
      assert.ok(res.status < 300, `${res.status} ${await res.text()}`);
    }
    assert.deepEqual(
      new Set(lb.sentTo.slice(before)),
      new Set(nodes.map((n) => n.url)),
      'every node got chunks',
    );
    // The progress is the holder's, whichever node is asked.
    for (const n of nodes) {
      const state = await api<TransferJson>(n.url, 'GET', `/v1/transfers/${t.id}?token=${t.token}`);
      assert.equal(state.body.bytes_received, size, n.url);
    }
    const fin = await api<Task>(lb.url, 'POST', `/v1/transfers/${t.id}/finalize?token=${t.token}&wait=30`);
    assert.ok(fin.status < 300, JSON.stringify(fin.body));
    assert.equal((await waitTask(lb.url, t.task_id)).status, 'success');
    for (const n of nodes) assert.equal(await sha256Url(`${n.url}/v1/vdis/${vdi.id}/contents`), sha256(data));
  });

  test('tus-js-client through the balancer: every PATCH may land on another node', async () => {
    const { lb } = await cluster();
    const size = 12 * MiB;
    const data = seededBytes(size, 502);
    const vdi = await createVdi(lb.url, size);
    const upload = await new Promise<tus.Upload>((resolve, reject) => {
      const u = new tus.Upload(data, {
        endpoint: `${lb.url}/v1/tus/`,
        chunkSize: MiB,
        metadata: { vdi: vdi.id, format: 'raw' },
        retryDelays: null,
        onSuccess: () => resolve(u),
        onError: reject,
      });
      u.start();
    });
    assert.ok(upload.url);
    await waitFor('the tus upload to be committed', async () => {
      const tasks = await api<Task[]>(lb.url, 'GET', `/v1/tasks?vdi=${vdi.id}`);
      return tasks.body.some((x) => x.status === 'success');
    });
    assert.equal(await sha256Url(`${lb.url}/v1/vdis/${vdi.id}/contents`), sha256(data));
  });

  test("an imageio client's flow (ticket, OPTIONS, PUTs, flush, extents) through the balancer", async () => {
    const { lb } = await cluster();
    const work = await tempDir();
    dirs.push(work);
    const size = 16 * MiB;
    const file = path.join(work, 'disk.raw');
    const data = seededBytes(size, 503);
    data.fill(0, 4 * MiB, 12 * MiB); // a hole the client skips
    await fsp.writeFile(file, data);
    const vdi = await createVdi(lb.url, size);
    const ticket = await api(lb.url, 'PUT', '/v1/imageio/tickets/cluster-ticket', {
      uuid: 'cluster-ticket',
      url: `vdi:${vdi.id}`,
      ops: ['read', 'write'],
      size,
      timeout: 300,
    });
    assert.ok(ticket.status < 300, JSON.stringify(ticket.body));
    const url = `${lb.url}/images/cluster-ticket`;
    await imageio.options(url);
    await imageio.upload(url, file, await imageio.localExtents(file, 'raw'), 3);
    assert.equal(await sha256Url(url), sha256(data));
    const extents = await imageio.extents(url);
    assert.deepEqual(
      extents.map((e) => [e.start, e.length, e.zero]),
      [
        [0, 4 * MiB, false],
        [4 * MiB, 8 * MiB, true],
        [12 * MiB, 4 * MiB, false],
      ],
    );
    const fin = await api(lb.url, 'POST', '/v1/imageio/tickets/cluster-ticket/finalize');
    assert.ok(fin.status < 300, JSON.stringify(fin.body));
    await waitFor('the ticket to be committed', async () => {
      const tasks = await api<Task[]>(lb.url, 'GET', `/v1/tasks?vdi=${vdi.id}`);
      return tasks.body.some((x) => x.status === 'success');
    });
    assert.equal(await sha256Url(`${lb.url}/v1/vdis/${vdi.id}/contents`), sha256(data));
  });

  test('the holder killed -9 mid-upload: another node takes the session over and the upload goes on', async () => {
    const { nodes, lb } = await cluster();
    const size = 16 * MiB;
    const data = seededBytes(size, 504);
    const vdi = await createVdi(lb.url, size);
    const t = await openUpload<TransferJson>(nodes[0].url, vdi.id, size);
    for (let start = 0; start < size / 2; start += MiB) {
      const res = await putChunk(lb.url, t, data.subarray(start, start + MiB), start, size);
      assert.ok(res.status < 300, await res.text());
    }
    await nodes[0].stop('SIGKILL');
    lb.remove(nodes[0].url);
    const killedAt = Date.now();
    for (let start = size / 2; start < size; start += MiB) {
      await putChunkRetrying(lb.url, t, data.subarray(start, start + MiB), start, size);
    }
    const tookOver = Date.now() - killedAt;
    assert.ok(tookOver < TAKEOVER_BOUND_MS, `taken over after ${tookOver} ms`);
    const holder = await holderOf(lb.url, t.id, nodes);
    assert.ok(holder && holder !== nodes[0], 'a live node holds the session');
    const fin = await api<Task>(lb.url, 'POST', `/v1/transfers/${t.id}/finalize?token=${t.token}&wait=30`);
    assert.ok(fin.status < 300, JSON.stringify(fin.body));
    assert.equal((await waitTask(lb.url, t.task_id)).status, 'success');
    assert.equal(await sha256Url(`${lb.url}/v1/vdis/${vdi.id}/contents`), sha256(data));
  });

  test('the holder killed -9 during a finalize: another node runs it again from the staged bytes', async () => {
    const { nodes, lb } = await cluster();
    const work = await tempDir();
    dirs.push(work);
    // A qcow2 upload into a raw VDI converts at finalize: work a kill can cut.
    const size = 96 * MiB;
    const raw = path.join(work, 'disk.raw');
    const data = seededBytes(size, 505);
    await fsp.writeFile(raw, data);
    const qcow2 = path.join(work, 'disk.qcow2');
    await execFileP('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2]);
    const image = await fsp.readFile(qcow2);
    const vdi = await createVdi(lb.url, size);
    const t = await openUpload<TransferJson>(nodes[1].url, vdi.id, image.length, 'qcow2');
    for (let start = 0; start < image.length; start += 8 * MiB) {
      const chunk = image.subarray(start, Math.min(start + 8 * MiB, image.length));
      const res = await putChunk(lb.url, t, chunk, start, image.length);
      assert.ok(res.status < 300, await res.text());
    }
    const finalize = api(nodes[1].url, 'POST', `/v1/transfers/${t.id}/finalize?token=${t.token}`).catch(
      () => null,
    );
    await waitFor('the finalize to start', async () => {
      const s = await api<TransferJson>(nodes[0].url, 'GET', `/v1/transfers/${t.id}`);
      return s.body.state !== 'open';
    });
    await nodes[1].stop('SIGKILL');
    lb.remove(nodes[1].url);
    await finalize;
    const task = await waitTask(lb.url, t.task_id);
    assert.equal(task.status, 'success', JSON.stringify(task));
    assert.equal(await sha256Url(`${lb.url}/v1/vdis/${vdi.id}/contents`), sha256(data));
  });

  test('the node running a pull killed -9 mid-way: another takes the pull over and resumes with Range', async () => {
    const { nodes, lb } = await cluster();
    const size = 32 * MiB;
    const data = seededBytes(size, 506);
    // The source: sends 8 MiB of the first request, then stalls until released.
    const ranges: (string | undefined)[] = [];
    let release: (() => void) | null = null;
    const source = http.createServer((req, res) => {
      ranges.push(req.headers.range);
      const from = Number(/^bytes=(\d+)-/.exec(req.headers.range ?? '')?.[1] ?? 0);
      const headers = { etag: '"v1"', 'accept-ranges': 'bytes', 'content-length': String(size - from) };
      if (from) res.writeHead(206, { ...headers, 'content-range': `bytes ${from}-${size - 1}/${size}` });
      else res.writeHead(200, headers);
      if (ranges.length > 1) return res.end(data.subarray(from));
      res.write(data.subarray(0, 8 * MiB));
      new Promise<void>((r) => {
        release = r;
      }).then(() => res.destroy());
    });
    source.listen(0, '127.0.0.1');
    await once(source, 'listening');
    try {
      const vdi = await createVdi(lb.url, size);
      const pulled = await api<TransferJson>(nodes[2].url, 'POST', '/v1/transfers', {
        vdi: vdi.id,
        direction: 'upload',
        format: 'raw',
        source_url: `http://127.0.0.1:${(source.address() as AddressInfo).port}/disk.raw`,
      });
      assert.equal(pulled.status, 201, JSON.stringify(pulled.body));
      await waitFor('the source to stall', () => release);
      await waitFor('a checkpoint of the received bytes', async () => {
        const list = await api<TransferJson[]>(nodes[0].url, 'GET', `/v1/transfers?vdi=${vdi.id}`);
        return list.body.find((x) => x.id === pulled.body.id)?.bytes_received;
      });
      await nodes[2].stop('SIGKILL');
      (release as unknown as () => void)();
      const task = await waitTask(nodes[0].url, pulled.body.task_id);
      assert.equal(task.status, 'success', JSON.stringify(task));
      assert.equal(ranges.length, 2, JSON.stringify(ranges));
      assert.match(ranges[1] ?? '', /^bytes=[1-9]\d*-$/, 'resumed from the bytes already received');
      assert.equal(await sha256Url(`${nodes[1].url}/v1/vdis/${vdi.id}/contents`), sha256(data));
    } finally {
      source.close();
    }
  });

  test('the node running a push killed -9 mid-way: another takes the push over and sends what the receiver lacks', async () => {
    const { nodes, lb } = await cluster();
    const receiverDir = await tempDir();
    dirs.push(receiverDir);
    const receiver = await spawnServer(receiverDir);
    servers.push(receiver);
    const size = 48 * MiB;
    const data = seededBytes(size, 508);
    const source = await createVdi(lb.url, size);
    assert.equal(
      (
        await fetch(`${lb.url}/v1/vdis/${source.id}/contents?format=raw`, {
          method: 'PUT',
          body: new Uint8Array(data),
        })
      ).status,
      200,
    );
    const target = await createVdi(receiver.url, size);
    const receiving = (
      await api<TransferJson & { url: string }>(receiver.url, 'POST', '/v1/transfers', {
        vdi: target.id,
        direction: 'upload',
        format: 'raw',
      })
    ).body;
    // The link to the receiver goes down after 16 MiB: the push waits and retries, on node 0.
    const link = await cutProxy(receiver.url, {
      seed: 1,
      cutConnections: 0,
      direction: 'up',
      minBytes: 0,
      maxBytes: 0,
    });
    link.downAt = 16 * MiB;
    try {
      const via = new URL(receiving.url);
      via.host = new URL(link.url).host;
      const push = await api<TransferJson>(nodes[0].url, 'POST', '/v1/transfers', {
        vdi: source.id,
        direction: 'download',
        format: 'raw',
        target_url: via.href,
      });
      assert.equal(push.status, 201, JSON.stringify(push.body));
      await waitFor('the link to go down mid-push', () => link.downAt === undefined);
      await nodes[0].stop('SIGKILL');
      link.up();
      const task = await waitTask(nodes[1].url, push.body.task_id);
      assert.equal(task.status, 'success', JSON.stringify(task));
      assert.ok(link.bytesUp < size + 24 * MiB, `${link.bytesUp} bytes sent for ${size}`);
      assert.equal(await sha256Url(`${receiver.url}/v1/vdis/${target.id}/contents`), sha256(data));
    } finally {
      await link.close();
    }
  });

  test('a holder that cannot be reached: 503 NODE_UNREACHABLE with Retry-After, never another node writing', async () => {
    const { dataDir, nodes } = await cluster();
    const size = 4 * MiB;
    const vdi = await createVdi(nodes[0].url, size);
    const t = await openUpload<TransferJson>(nodes[0].url, vdi.id, size);
    const list = await api<{ id: string; self: boolean }[]>(nodes[0].url, 'GET', '/v1/nodes');
    const self = list.body.find((n) => n.self)!;
    // Alive by its heartbeat, unreachable where it says it listens.
    execSqlAt(dataDir, `UPDATE nodes SET address = 'http://127.0.0.1:1' WHERE id = '${self.id}'`);
    const res = await putChunk(nodes[1].url, t, seededBytes(MiB, 507), 0, size);
    assert.equal(res.status, 503);
    assert.ok(Number(res.headers.get('retry-after')) > 0);
    const body = (await res.json()) as ErrorBody;
    assert.equal(body.error.code, 'NODE_UNREACHABLE');
    assert.match(body.error.message, /retry/);
    assert.ok(
      !JSON.stringify(body).includes('127.0.0.1:1'),
      "the cluster's internal address is not told the client",
    );
    const state = await api<TransferJson>(nodes[0].url, 'GET', `/v1/transfers/${t.id}?token=${t.token}`);
    assert.equal(state.body.bytes_received, 0);
  });
});
