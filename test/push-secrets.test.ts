/**
 * A push keeps its receiver's URL (whose token is the push's only
 * credential), and a pull its source's URL (a presigned URL, a session's
 * token), so that they resume after a restart; with a service token each is
 * kept sealed, so whoever reads the data directory does not find them.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import { promises as fsp } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { api, type TransferJson } from './helpers/api.js';
import { storeRows } from './helpers/pg.js';
import {
  type ServerProcess,
  seededBytes,
  spawnServer,
  startServer,
  type TestServer,
  tempDir,
} from './helpers/server.js';

const MiB = 1024 * 1024;
const TOKEN = 'sender-management-token-0123456789';
const auth = { authorization: `Bearer ${TOKEN}` };
type Task = { status: string; error: { code: string; message: string } | null };

/** A TCP relay to `port` that holds every connection silent until `open()`. */
async function gate(port: number) {
  let opened = false;
  let connections = 0;
  const held: net.Socket[] = [];
  const relay = (client: net.Socket) => {
    const upstream = net.connect(port, '127.0.0.1');
    client.pipe(upstream).pipe(client);
    client.on('error', () => upstream.destroy());
    upstream.on('error', () => client.destroy());
  };
  const server = net.createServer((client) => {
    connections++;
    if (opened) relay(client);
    else held.push(client.on('error', () => {}));
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    port: (server.address() as net.AddressInfo).port,
    get connections() {
      return connections;
    },
    open() {
      opened = true;
      for (const s of held.splice(0)) s.destroy(); // what the dead sender had open
    },
    close: () => {
      for (const s of held) s.destroy();
      return new Promise((r) => server.close(r));
    },
  };
}

/**
 * Every byte diskport keeps at rest: its data directory's files, and the
 * rows of its metadata store (SQLite's file is among the former; a
 * PostgreSQL database is elsewhere, so it is read by its rows).
 */
async function dataDirBytes(dataDir: string): Promise<Buffer> {
  const parts: Buffer[] = [Buffer.from(storeRows(dataDir))];
  for (const name of await fsp.readdir(dataDir, { recursive: true })) {
    const file = path.join(dataDir, name);
    if ((await fsp.stat(file)).isFile()) parts.push(await fsp.readFile(file));
  }
  return Buffer.concat(parts);
}

describe('push secrets at rest', () => {
  let dir: string;
  let receiver: TestServer;
  before(async () => {
    dir = await tempDir();
    receiver = await startServer();
  });
  after(async () => {
    await receiver.close();
    await fsp.rm(dir, { recursive: true, force: true });
  });

  /** A sender with a disk of seeded data, and a receiving session behind a closed gate. */
  async function pushBehindGate(dataDir: string) {
    const sender = await spawnServer(dataDir, ['--token', TOKEN, '--allow-fetch', '127.0.0.0/8']);
    const data = seededBytes(4 * MiB, 77);
    const source = await api<{ id: string }>(
      sender.url,
      'POST',
      '/v1/vdis',
      { name_label: 'source', virtual_size: data.length },
      auth,
    );
    const put = await fetch(`${sender.url}/v1/vdis/${source.body.id}/contents?format=raw`, {
      method: 'PUT',
      headers: auth,
      body: new Uint8Array(data),
    });
    assert.equal(put.status, 200, await put.text());
    const target = await api<{ id: string }>(receiver.url, 'POST', '/v1/vdis', {
      name_label: 'target',
      virtual_size: data.length,
    });
    const receiving = (
      await api<TransferJson>(receiver.url, 'POST', '/v1/transfers', {
        vdi: target.body.id,
        direction: 'upload',
        format: 'raw',
      })
    ).body;
    const g = await gate(Number(new URL(receiver.url).port));
    const url = new URL(receiving.url);
    url.port = String(g.port);
    const push = await api<TransferJson>(
      sender.url,
      'POST',
      '/v1/transfers',
      { vdi: source.body.id, direction: 'download', format: 'raw', target_url: url.href },
      auth,
    );
    assert.equal(push.status, 201, JSON.stringify(push.body));
    for (let i = 0; g.connections === 0; i++) {
      assert.ok(i < 200, 'the push never tried to reach the receiver');
      await sleep(50);
    }
    return { sender, data, target: target.body.id, receiving, push: push.body, gate: g };
  }

  test("the receiver's token is not in the data directory, and the push still resumes after a kill -9", async () => {
    const dataDir = path.join(dir, 'a');
    const p = await pushBehindGate(dataDir);
    let sender: ServerProcess = p.sender;
    try {
      const atRest = await dataDirBytes(dataDir);
      assert.ok(atRest.includes(Buffer.from(p.push.id)), 'the push session is in the data directory');
      assert.ok(!atRest.includes(Buffer.from(p.receiving.token)), "the receiver's token is not, in clear");
      await sender.stop('SIGKILL');
      p.gate.open();
      sender = await spawnServer(dataDir, ['--token', TOKEN, '--allow-fetch', '127.0.0.0/8']);
      const task = await api<Task>(sender.url, 'GET', `/v1/tasks/${p.push.task_id}?wait=60`, undefined, auth);
      assert.equal(task.body.status, 'success', JSON.stringify(task.body));
      const sum = await api<{ checksum: string }>(
        receiver.url,
        'GET',
        `/v1/vdis/${p.target}/checksum?algorithm=sha256&async=false`,
      );
      assert.equal(sum.body.checksum, createHash('sha256').update(p.data).digest('hex'));
    } finally {
      await sender.stop('SIGKILL');
      await p.gate.close();
    }
  });

  test('a sender restarted with another token cannot open the sealed URL: the push fails, saying why', async () => {
    const dataDir = path.join(dir, 'b');
    const p = await pushBehindGate(dataDir);
    let sender: ServerProcess = p.sender;
    try {
      await sender.stop('SIGKILL');
      const other = 'another-management-token-9876543210';
      sender = await spawnServer(dataDir, ['--token', other, '--allow-fetch', '127.0.0.0/8']);
      const task = await api<Task>(sender.url, 'GET', `/v1/tasks/${p.push.task_id}?wait=30`, undefined, {
        authorization: `Bearer ${other}`,
      });
      assert.equal(task.body.status, 'failure', JSON.stringify(task.body));
      assert.equal(task.body.error?.code, 'INTERRUPTED');
      assert.match(task.body.error!.message, /another token.*start the push again/);
      // The receiver's session is left open for another push.
      const state = await api<{ state: string }>(receiver.url, 'GET', `/v1/transfers/${p.receiving.id}`);
      assert.equal(state.body.state, 'open');
    } finally {
      await sender.stop('SIGKILL');
      await p.gate.close();
    }
  });
});

describe('pull secrets at rest', () => {
  let dir: string;
  let source: TestServer;
  before(async () => {
    dir = await tempDir();
    source = await startServer();
  });
  after(async () => {
    await source.close();
    await fsp.rm(dir, { recursive: true, force: true });
  });

  /** A puller fetching, behind a closed gate, a download session's URL (its token the only credential). */
  async function pullBehindGate(dataDir: string) {
    const data = seededBytes(4 * MiB, 78);
    const vdi = await api<{ id: string }>(source.url, 'POST', '/v1/vdis', {
      name_label: 'source',
      virtual_size: data.length,
    });
    const put = await fetch(`${source.url}/v1/vdis/${vdi.body.id}/contents?format=raw`, {
      method: 'PUT',
      body: new Uint8Array(data),
    });
    assert.equal(put.status, 200, await put.text());
    const download = (
      await api<TransferJson>(source.url, 'POST', '/v1/transfers', {
        vdi: vdi.body.id,
        direction: 'download',
        format: 'raw',
      })
    ).body;
    const g = await gate(Number(new URL(source.url).port));
    const url = new URL(download.url);
    url.port = String(g.port);
    const puller = await spawnServer(dataDir, ['--token', TOKEN, '--allow-fetch', '127.0.0.0/8']);
    const target = await api<{ id: string }>(
      puller.url,
      'POST',
      '/v1/vdis',
      { name_label: 'target', virtual_size: data.length },
      auth,
    );
    const pull = await api<TransferJson>(
      puller.url,
      'POST',
      '/v1/transfers',
      { vdi: target.body.id, direction: 'upload', format: 'raw', source_url: url.href },
      auth,
    );
    assert.equal(pull.status, 201, JSON.stringify(pull.body));
    for (let i = 0; g.connections === 0; i++) {
      assert.ok(i < 200, 'the pull never tried to reach the source');
      await sleep(50);
    }
    return { puller, data, target: target.body.id, download, pull: pull.body, gate: g };
  }

  test("the source's token is not in the data directory, and the pull still resumes after a kill -9", async () => {
    const dataDir = path.join(dir, 'a');
    const p = await pullBehindGate(dataDir);
    let puller: ServerProcess = p.puller;
    try {
      const atRest = await dataDirBytes(dataDir);
      assert.ok(atRest.includes(Buffer.from(p.pull.id)), 'the pull session is in the data directory');
      assert.ok(!atRest.includes(Buffer.from(p.download.token)), "the source's token is not, in clear");
      await puller.stop('SIGKILL');
      p.gate.open();
      puller = await spawnServer(dataDir, ['--token', TOKEN, '--allow-fetch', '127.0.0.0/8']);
      const task = await api<Task>(puller.url, 'GET', `/v1/tasks/${p.pull.task_id}?wait=60`, undefined, auth);
      assert.equal(task.body.status, 'success', JSON.stringify(task.body));
      const sum = await api<{ checksum: string }>(
        puller.url,
        'GET',
        `/v1/vdis/${p.target}/checksum?algorithm=sha256&async=false`,
        undefined,
        auth,
      );
      assert.equal(sum.body.checksum, createHash('sha256').update(p.data).digest('hex'));
    } finally {
      await puller.stop('SIGKILL');
      await p.gate.close();
    }
  });

  test('a puller restarted with another token cannot open the sealed URL: the pull fails, saying why, and the VDI is unchanged', async () => {
    const dataDir = path.join(dir, 'b');
    const p = await pullBehindGate(dataDir);
    let puller: ServerProcess = p.puller;
    try {
      await puller.stop('SIGKILL');
      const other = 'another-management-token-9876543210';
      const otherAuth = { authorization: `Bearer ${other}` };
      puller = await spawnServer(dataDir, ['--token', other, '--allow-fetch', '127.0.0.0/8']);
      const task = await api<Task>(
        puller.url,
        'GET',
        `/v1/tasks/${p.pull.task_id}?wait=30`,
        undefined,
        otherAuth,
      );
      assert.equal(task.body.status, 'failure', JSON.stringify(task.body));
      assert.equal(task.body.error?.code, 'INTERRUPTED');
      assert.match(task.body.error!.message, /another token.*start the pull again/);
      const vdi = await api<{ generation: number }>(
        puller.url,
        'GET',
        `/v1/vdis/${p.target}`,
        undefined,
        otherAuth,
      );
      assert.equal(vdi.body.generation, 0, 'the VDI is unchanged');
    } finally {
      await puller.stop('SIGKILL');
      await p.gate.close();
    }
  });
});
