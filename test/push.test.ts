/**
 * Push: one diskport sends a disk to an upload transfer opened on another,
 * through a proxy that cuts the connection; only the data crosses the wire,
 * the push resumes from what the receiver holds, and both disks end equal.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { promises as fsp } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { api, createVdi, type TransferJson } from './helpers/api.js';
import { failNthDirectWrite } from './helpers/faults.js';
import { sample, scrape } from './helpers/metrics.js';
import { type ServerProcess, seededBytes, spawnServer, startServer, tempDir } from './helpers/server.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

type Task = {
  id: string;
  status: string;
  bytes_done: number;
  bytes_total: number | null;
  error: { code: string; message: string } | null;
  result: Record<string, unknown> | null;
};
type ErrorBody = { error: { code: string; message: string } };

/** A TCP proxy in front of `target` that counts the bytes it carries and can cut every connection once. */
async function countingProxy(target: URL) {
  const state = { bytes: 0, cutAt: Number.POSITIVE_INFINITY, cuts: 0, stallAt: Number.POSITIVE_INFINITY };
  const sockets = new Set<net.Socket>();
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(target.port), target.hostname);
    sockets.add(client).add(upstream);
    const cut = () => {
      state.cuts++;
      state.cutAt = Number.POSITIVE_INFINITY;
      client.destroy();
      upstream.destroy();
    };
    const relay = (from: net.Socket, to: net.Socket) =>
      from.on('data', (chunk: Buffer) => {
        if (state.bytes >= state.stallAt) {
          from.pause(); // a link that goes silent: nothing more passes
          return;
        }
        state.bytes += chunk.length;
        if (state.bytes >= state.cutAt) return cut();
        if (!to.write(chunk)) {
          from.pause();
          to.once('drain', () => from.resume());
        }
      });
    relay(client, upstream);
    relay(upstream, client);
    client.on('error', () => upstream.destroy());
    upstream.on('error', () => client.destroy());
    client.on('close', () => upstream.end());
    upstream.on('close', () => client.end());
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    state,
    port: (server.address() as net.AddressInfo).port,
    /** Breaks every connection, as a network that drops does. */
    dropAll() {
      for (const s of sockets) s.destroy();
    },
    close() {
      for (const s of sockets) s.destroy();
      return new Promise((r) => server.close(r));
    },
  };
}

describe('push: one diskport sends a disk to another', () => {
  let dir: string;
  let a: ServerProcess;
  let b: ServerProcess;
  before(async () => {
    dir = await tempDir();
    [a, b] = await Promise.all([
      spawnServer(path.join(dir, 'a'), ['--allow-fetch', '127.0.0.0/8']),
      spawnServer(path.join(dir, 'b')),
    ]);
  });
  after(async () => {
    await Promise.all([a?.stop(), b?.stop()]);
    await fsp.rm(dir, { recursive: true, force: true });
  });

  const open = async (base: string, body: Record<string, unknown>) => {
    const res = await api<TransferJson>(base, 'POST', '/v1/transfers', body);
    assert.equal(res.status, 201, JSON.stringify(res.body));
    return res.body;
  };
  const waitTask = async (base: string, id: string) => {
    for (let i = 0; ; i++) {
      const res = await api<Task>(base, 'GET', `/v1/tasks/${id}?wait=5`);
      if (!['pending', 'running'].includes(res.body.status)) return res.body;
      assert.ok(i < 12, `task still running after a minute: ${JSON.stringify(res.body)}`);
    }
  };
  const checksum = async (base: string, vdi: string) => {
    const res = await api<{ checksum: string }>(
      base,
      'GET',
      `/v1/vdis/${vdi}/checksum?algorithm=sha256&async=false`,
    );
    assert.equal(res.status, 200, JSON.stringify(res.body));
    return res.body.checksum;
  };

  /** A VDI on A of `size` bytes holding `regions` of seeded data, landed through a session: data chunks, zero ops for the rest. */
  async function diskOnA(size: number, regions: [start: number, length: number][]) {
    const vdi = await createVdi(a.url, size);
    const t = await open(a.url, { vdi: vdi.id, direction: 'upload', format: 'raw', size });
    let pos = 0;
    for (const [i, [start, length]] of regions.entries()) {
      if (start > pos) await zeroOp(t.url, pos, start - pos);
      for (let at = start; at < start + length; at += 8 * MiB) {
        const data = seededBytes(Math.min(8 * MiB, start + length - at), 1000 * i + at / MiB);
        const res = await fetch(t.url, {
          method: 'PUT',
          headers: { 'content-range': `bytes ${at}-${at + data.length - 1}/${size}` },
          body: new Uint8Array(data),
        });
        assert.equal(res.status, 200, await res.text());
      }
      pos = start + length;
    }
    if (pos < size) await zeroOp(t.url, pos, size - pos);
    const fin = await api<Task>(a.url, 'POST', `/v1/transfers/${t.id}/finalize?token=${t.token}&wait=60`);
    assert.equal(fin.body.status, 'success', JSON.stringify(fin.body));
    return vdi.id;
  }

  /** An upload session on B for a new VDI of `size`, reached through a counting proxy. */
  async function receiverBehindProxy(size: number) {
    const target = await createVdi(b.url, size);
    const receiving = await open(b.url, { vdi: target.id, direction: 'upload', format: 'raw' });
    return { target, receiving, proxy: await countingProxy(new URL(b.url)) };
  }

  /** Pushes `source` from A as raw to the receiving url, through the proxy on `port` if one is given. */
  function pushRaw(source: string, receivingUrl: string, port?: number) {
    const url = new URL(receivingUrl);
    if (port !== undefined) url.host = `127.0.0.1:${port}`;
    return open(a.url, { vdi: source, direction: 'download', format: 'raw', target_url: url.href });
  }

  async function zeroOp(url: string, offset: number, size: number) {
    const res = await fetch(url, {
      method: 'PATCH',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ op: 'zero', offset, size }),
    });
    assert.equal(res.status, 200, await res.text());
  }

  test('pushes a 4 GiB raw disk with 64 MiB of data through a proxy that cuts once: resumes, sends only the data, same checksum', async (t) => {
    const size = 4 * GiB;
    const regions: [number, number][] = [
      [0, 16 * MiB],
      [GiB + 4096, 16 * MiB],
      [2 * GiB + 3 * MiB, 24 * MiB],
      [size - 8 * MiB, 8 * MiB],
    ];
    const dataBytes = regions.reduce((n, [, l]) => n + l, 0);
    assert.equal(dataBytes, 64 * MiB);
    const source = await diskOnA(size, regions);

    const { target, receiving, proxy } = await receiverBehindProxy(size);
    const metricsBefore = await scrape(a.url);
    try {
      proxy.state.cutAt = 40 * MiB;
      const push = await pushRaw(source, receiving.url, proxy.port);
      const task = await waitTask(a.url, push.task_id);
      assert.equal(task.status, 'success', JSON.stringify(task));
      assert.equal(proxy.state.cuts, 1, 'the proxy cut the connection once');
      assert.ok((task.result?.retries as number) >= 1, JSON.stringify(task.result));
      assert.equal(task.bytes_total, size);
      assert.equal(task.bytes_done, size);
      assert.ok(
        proxy.state.bytes < 1.1 * dataBytes,
        `${(proxy.state.bytes / MiB).toFixed(1)} MiB crossed the proxy for ${dataBytes / MiB} MiB of data`,
      );

      t.diagnostic(
        `${(proxy.state.bytes / MiB).toFixed(2)} MiB through the proxy for ${dataBytes / MiB} MiB of data; result ${JSON.stringify(task.result)}`,
      );
      // The byte metric says what crossed the wire, not the 4 GiB the receiver now holds.
      const sent =
        (sample(await scrape(a.url), 'diskport_bytes_sent_total', { format: 'raw' }) ?? 0) -
        (sample(metricsBefore, 'diskport_bytes_sent_total', { format: 'raw' }) ?? 0);
      assert.ok(sent >= dataBytes && sent < 1.1 * dataBytes, `bytes_sent_total rose by ${sent}`);
      const remote = await api<TransferJson>(b.url, 'GET', `/v1/transfers/${receiving.id}`);
      assert.equal(remote.body.state, 'committed');
      const local = await api<TransferJson>(a.url, 'GET', `/v1/transfers/${push.id}`);
      assert.equal(local.body.state, 'committed');
      assert.equal(await checksum(b.url, target.id), await checksum(a.url, source));
    } finally {
      await proxy.close();
    }
  });

  test('a push cut by a kill -9 of the sender resumes after its restart and sends only what is missing', async () => {
    const size = GiB;
    const regions: [number, number][] = [
      [0, 24 * MiB],
      [512 * MiB, 40 * MiB],
    ];
    const source = await diskOnA(size, regions);
    const { target, receiving, proxy } = await receiverBehindProxy(size);
    try {
      proxy.state.stallAt = 30 * MiB;
      const push = await pushRaw(source, receiving.url, proxy.port);
      while (proxy.state.bytes < 30 * MiB) await new Promise((r) => setTimeout(r, 50));
      const before = (
        await api<TransferJson & { bytes_received: number }>(b.url, 'GET', `/v1/transfers/${receiving.id}`)
      ).body.bytes_received;
      assert.ok(before >= 16 * MiB, `the receiver had ${before} bytes when the sender died`);
      await a.stop('SIGKILL');
      proxy.dropAll();
      proxy.state.stallAt = Number.POSITIVE_INFINITY;
      a = await spawnServer(path.join(dir, 'a'), ['--allow-fetch', '127.0.0.0/8']);
      const task = await waitTask(a.url, push.task_id);
      assert.equal(task.status, 'success', JSON.stringify(task));
      const remote = await api<TransferJson>(b.url, 'GET', `/v1/transfers/${receiving.id}`);
      assert.equal(remote.body.state, 'committed');
      assert.equal(await checksum(b.url, target.id), await checksum(a.url, source));
      assert.ok(
        proxy.state.bytes < 64 * MiB + 16 * MiB,
        `${proxy.state.bytes} bytes crossed for 64 MiB of data`,
      );
    } finally {
      await proxy.close();
    }
  });

  for (const format of ['vhd', 'qcow2'] as const) {
    test(`pushes a disk as ${format}: the serialized stream in one streamed PUT, committed on the receiver`, async () => {
      const size = 40 * MiB + 7 * 512;
      const source = await diskOnA(size, [
        [MiB, 3 * MiB],
        [20 * MiB + 4096, 9 * MiB],
      ]);
      const target = await createVdi(b.url, size);
      const receiving = await open(b.url, { vdi: target.id, direction: 'upload', format });
      const push = await open(a.url, {
        vdi: source,
        direction: 'download',
        format,
        target_url: receiving.url,
      });
      const task = await waitTask(a.url, push.task_id);
      assert.equal(task.status, 'success', JSON.stringify(task));
      assert.equal(await checksum(b.url, target.id), await checksum(a.url, source));
    });
  }

  test("the receiver's failed import fails the push (REMOTE_IMPORT_FAILED); its VDI is unchanged", async () => {
    const size = 8 * MiB;
    const source = await diskOnA(size, [[0, 2 * MiB]]);
    const target = await createVdi(b.url, size);
    const before = await checksum(b.url, target.id);
    const receiving = await open(b.url, {
      vdi: target.id,
      direction: 'upload',
      format: 'raw',
      checksum: `sha256:${'0'.repeat(64)}`,
    });
    const push = await pushRaw(source, receiving.url);
    const task = await waitTask(a.url, push.task_id);
    assert.equal(task.status, 'failure');
    assert.equal(task.error?.code, 'REMOTE_IMPORT_FAILED');
    assert.match(task.error?.message ?? '', /CHECKSUM_MISMATCH/);
    assert.equal(await checksum(b.url, target.id), before);
  });

  test('a receiver out of space (507) is an answer: the push fails at once with REMOTE_REJECTED, its session stays open', async () => {
    const size = 24 * MiB;
    const source = await diskOnA(size, [[0, 16 * MiB]]);
    // The receiver runs in this process, so a write can fail as a full disk fails it: the first
    // 4 MiB write of the second 8 MiB chunk.
    const receiver = await startServer({ dataDir: path.join(dir, 'full') });
    const fault = failNthDirectWrite(3);
    try {
      const target = await createVdi(receiver.url, size);
      const receiving = await open(receiver.url, { vdi: target.id, direction: 'upload', format: 'raw' });
      const push = await pushRaw(source, receiving.url);
      const task = await waitTask(a.url, push.task_id);
      // A retry would find the space back (only one write fails) and succeed: out of space is not retried.
      assert.equal(task.status, 'failure', JSON.stringify(task));
      assert.equal(task.error?.code, 'REMOTE_REJECTED');
      assert.match(task.error?.message ?? '', /507 INSUFFICIENT_SPACE/);
      assert.equal(fault.writes, 3, 'the failed write was not tried again: the 507 was not retried');
      const remote = await api<TransferJson>(receiver.url, 'GET', `/v1/transfers/${receiving.id}`);
      assert.equal(remote.body.state, 'open', 'the receiving session stays open for another push');
      // Space made, a second push of the same disk completes the same receiving session.
      const again = await pushRaw(source, receiving.url);
      assert.equal((await waitTask(a.url, again.task_id)).status, 'success');
      assert.equal(await checksum(receiver.url, target.id), await checksum(a.url, source));
    } finally {
      fault.restore();
      await receiver.close();
    }
  });

  test('a receiver that takes another format fails the push with FORMAT_MISMATCH before a byte is sent', async () => {
    const source = await diskOnA(4 * MiB, [[0, MiB]]);
    const target = await createVdi(b.url, 4 * MiB);
    const receiving = await open(b.url, { vdi: target.id, direction: 'upload', format: 'qcow2' });
    const push = await pushRaw(source, receiving.url);
    const task = await waitTask(a.url, push.task_id);
    assert.equal(task.status, 'failure');
    assert.equal(task.error?.code, 'FORMAT_MISMATCH');
    const remote = await api<TransferJson & { bytes_received: number }>(
      b.url,
      'GET',
      `/v1/transfers/${receiving.id}?token=${receiving.token}`,
    );
    assert.equal(remote.body.bytes_received, 0);
    assert.equal(remote.body.state, 'open', 'the receiving session stays open for another try');
  });

  test('a receiving transfer that is a download fails the push with REMOTE_NOT_UPLOAD before a byte is sent', async () => {
    const source = await diskOnA(4 * MiB, [[0, MiB]]);
    const target = await createVdi(b.url, 4 * MiB);
    const receiving = await open(b.url, { vdi: target.id, direction: 'download', format: 'raw' });
    const push = await pushRaw(source, receiving.url);
    const task = await waitTask(a.url, push.task_id);
    assert.equal(task.status, 'failure', JSON.stringify(task));
    assert.equal(task.error?.code, 'REMOTE_NOT_UPLOAD');
    const remote = await api<Task>(b.url, 'GET', `/v1/tasks/${receiving.task_id}`);
    assert.equal(remote.body.bytes_done, 0, 'nothing was read from the download either');
  });

  test('a receiving transfer that was cancelled fails the push with REMOTE_TRANSFER_ENDED; its VDI is unchanged', async () => {
    const source = await diskOnA(4 * MiB, [[0, MiB]]);
    const target = await createVdi(b.url, 4 * MiB);
    const before = await checksum(b.url, target.id);
    const receiving = await open(b.url, { vdi: target.id, direction: 'upload', format: 'raw' });
    const cancelled = await api<TransferJson>(
      b.url,
      'DELETE',
      `/v1/transfers/${receiving.id}?token=${receiving.token}`,
    );
    assert.equal(cancelled.body.state, 'cancelled');
    const push = await pushRaw(source, receiving.url);
    const task = await waitTask(a.url, push.task_id);
    assert.equal(task.status, 'failure', JSON.stringify(task));
    assert.equal(task.error?.code, 'REMOTE_TRANSFER_ENDED');
    assert.match(task.error?.message ?? '', /cancelled/);
    assert.equal(await checksum(b.url, target.id), before);
  });

  test('a receiver that answers 503 to every request fails the push with REMOTE_UNAVAILABLE after bounded retries', async () => {
    const source = await diskOnA(4 * MiB, [[0, MiB]]);
    // A real HTTP server on a socket, down as a receiver behind a failing proxy is.
    let requests = 0;
    const down = http.createServer((req, res) => {
      requests++;
      req.resume();
      res.writeHead(503, { 'content-type': 'text/plain' }).end('service unavailable');
    });
    down.listen(0, '127.0.0.1');
    await once(down, 'listening');
    try {
      const port = (down.address() as net.AddressInfo).port;
      const push = await pushRaw(source, `http://127.0.0.1:${port}/v1/transfers/x/data?token=y`);
      const task = await waitTask(a.url, push.task_id);
      assert.equal(task.status, 'failure', JSON.stringify(task));
      assert.equal(task.error?.code, 'REMOTE_UNAVAILABLE');
      assert.match(task.error?.message ?? '', /503/);
      // The first attempt and its retries, then no more.
      assert.ok(requests >= 2 && requests <= 12, `${requests} requests`);
    } finally {
      down.closeAllConnections();
      await new Promise((r) => down.close(r));
    }
  });

  test('without --allow-fetch a loopback target_url is refused (400 FETCH_TARGET_FORBIDDEN); a non-transfer url is 400', async () => {
    const vdi = await createVdi(b.url, MiB);
    const forbidden = await api<ErrorBody>(b.url, 'POST', '/v1/transfers', {
      vdi: vdi.id,
      direction: 'download',
      target_url: `${a.url}/v1/transfers/x/data?token=y`,
    });
    assert.equal(forbidden.status, 400);
    assert.equal(forbidden.body.error.code, 'FETCH_TARGET_FORBIDDEN');
    const notTransfer = await api<ErrorBody>(a.url, 'POST', '/v1/transfers', {
      vdi: (await createVdi(a.url, MiB)).id,
      direction: 'download',
      target_url: `${b.url}/v1/vdis/x/contents`,
    });
    assert.equal(notTransfer.status, 400);
    assert.equal(notTransfer.body.error.code, 'INVALID_URL');
  });
});
