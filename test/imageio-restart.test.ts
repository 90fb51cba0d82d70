/**
 * ovirt-imageio tickets in a real diskport process: a kill -9 in the middle
 * of an upload leaves the VDI as it was and the ticket usable after the
 * restart, where the client resends what it had not flushed and finalizes;
 * and /images/ on the --imageio-socket Unix socket.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { api, createVdi, curl, execFileP } from './helpers/api.js';
import { execSqlAt } from './helpers/pg.js';
import { type ServerProcess, seededBytes, spawnServer, tempDir } from './helpers/server.js';
import { waitFor } from './helpers/wait.js';

const MiB = 1024 * 1024;
const SIZE = 8 * MiB;

describe('ovirt-imageio tickets across a kill -9, and on a Unix socket', () => {
  let dataDir: string;
  let socketPath: string;
  let server: ServerProcess;

  before(async () => {
    dataDir = await tempDir();
    socketPath = path.join(dataDir, 'imageio.sock');
    server = await spawnServer(dataDir, ['--imageio-socket', socketPath]);
  });
  after(async () => {
    await server.stop();
    await fsp.rm(dataDir, { recursive: true, force: true });
  });

  async function install(vdiId: string, ops: string[]): Promise<string> {
    const id = randomUUID();
    const res = await api(server.url, 'PUT', `/v1/imageio/tickets/${id}`, {
      uuid: id,
      size: SIZE,
      url: `vdi:${vdiId}`,
      ops,
      timeout: 3600,
      inactivity_timeout: 600,
    });
    assert.equal(res.status, 200, JSON.stringify(res.body));
    return id;
  }

  /**
   * What a kill during a ticket's finalize leaves (its session recorded as
   * finalizing, the ticket still installed), then the restart, and the
   * ticket's finalize asked again: it answers the commit's success.
   */
  async function killedFinalizing(ticket: string): Promise<void> {
    const status = await api<{ diskport: { transfer: string } }>(
      server.url,
      'GET',
      `/v1/imageio/tickets/${ticket}`,
    );
    await server.stop('SIGKILL');
    execSqlAt(
      dataDir,
      `UPDATE transfers SET state = 'finalizing' WHERE id = '${status.body.diskport.transfer}'`,
    );
    server = await spawnServer(dataDir, ['--imageio-socket', socketPath]);
    const fin = await api<{ status: string }>(
      server.url,
      'POST',
      `/v1/imageio/tickets/${ticket}/finalize?wait=60`,
    );
    assert.equal(fin.status, 202, JSON.stringify(fin.body));
    assert.equal(fin.body.status, 'success', JSON.stringify(fin.body));
  }

  async function contents(vdiId: string): Promise<Buffer> {
    const res = await fetch(`${server.url}/v1/vdis/${vdiId}/contents?format=raw`);
    assert.equal(res.status, 200);
    return Buffer.from(await res.arrayBuffer());
  }

  test('kill -9 in the middle of an upload: the VDI is unchanged, the ticket resumes after the restart and finalizes', async () => {
    const vdiId = (await createVdi(server.url, SIZE)).id;
    const original = seededBytes(SIZE, 40);
    const imp = await fetch(`${server.url}/v1/vdis/${vdiId}/contents?format=raw`, {
      method: 'PUT',
      body: new Uint8Array(original),
    });
    assert.equal(imp.status, 200);
    const ticket = await install(vdiId, ['read', 'write']);
    const image = seededBytes(SIZE, 41);
    const put = (start: number, end: number, flush: 'y' | 'n') =>
      fetch(`${server.url}/images/${ticket}?flush=${flush}`, {
        method: 'PUT',
        headers: { 'content-range': `bytes ${start}-${end - 1}/*` },
        body: new Uint8Array(image.subarray(start, end)),
      });
    // The first half flushed; the third quarter written with flush=n; the last in flight when the process dies.
    assert.equal((await put(0, SIZE / 2, 'y')).status, 200);
    assert.equal((await put(SIZE / 2, (3 * SIZE) / 4, 'n')).status, 200);
    let stall: () => void = () => {};
    const body = new ReadableStream<Uint8Array>({
      start(c) {
        c.enqueue(new Uint8Array(image.subarray((3 * SIZE) / 4, (3 * SIZE) / 4 + MiB)));
      },
      pull: () =>
        new Promise<void>((r) => {
          stall = r;
        }),
    });
    const inFlight = fetch(`${server.url}/images/${ticket}`, {
      method: 'PUT',
      headers: {
        'content-range': `bytes ${(3 * SIZE) / 4}-${SIZE - 1}/*`,
        'content-length': String(SIZE / 4),
      },
      body,
      duplex: 'half',
    } as RequestInit).catch(() => null);
    await waitFor('the PUT to be in flight', async () => {
      const s = await api<{ connections: number }>(server.url, 'GET', `/v1/imageio/tickets/${ticket}`);
      return s.body.connections === 1;
    });
    await server.stop('SIGKILL');
    stall();
    await inFlight;
    server = await spawnServer(dataDir, ['--imageio-socket', socketPath]);

    assert.ok((await contents(vdiId)).equals(original), 'a half-done upload never reaches the VDI');
    const status = await api<{ transferred: number; diskport: { state: string } }>(
      server.url,
      'GET',
      `/v1/imageio/tickets/${ticket}`,
    );
    assert.equal(status.status, 200);
    assert.equal(status.body.diskport.state, 'open');
    assert.ok(status.body.transferred >= SIZE / 2, 'what was flushed survived');
    const opts = await fetch(`${server.url}/images/${ticket}`, { method: 'OPTIONS' });
    assert.equal(opts.status, 200);
    // As imageio's docs say: after a failure, send again everything sent since the last flush.
    assert.equal((await put(SIZE / 2, SIZE, 'n')).status, 200);
    const flush = await fetch(`${server.url}/images/${ticket}`, {
      method: 'PATCH',
      body: JSON.stringify({ op: 'flush' }),
    });
    assert.equal(flush.status, 200);
    const fin = await api<{ status: string }>(
      server.url,
      'POST',
      `/v1/imageio/tickets/${ticket}/finalize?wait=60`,
    );
    assert.equal(fin.status, 202);
    assert.equal(fin.body.status, 'success');
    assert.ok((await contents(vdiId)).equals(image));
  });

  test("a kill between the session's finalize and the ticket's record of it: finalizing the ticket again answers the commit", async () => {
    const vdiId = (await createVdi(server.url, SIZE)).id;
    const ticket = await install(vdiId, ['read', 'write']);
    const image = seededBytes(SIZE, 42);
    const put = await fetch(`${server.url}/images/${ticket}`, { method: 'PUT', body: new Uint8Array(image) });
    assert.equal(put.status, 200);
    await killedFinalizing(ticket);
    assert.ok((await contents(vdiId)).equals(image));
    const again = await api<{ status: string }>(
      server.url,
      'POST',
      `/v1/imageio/tickets/${ticket}/finalize?wait=60`,
    );
    assert.equal(again.body.status, 'success', 'and once more: the ticket is finalized');
  });

  test('a kill during the finalize of a ticket that wrote part of a snapshotted disk: the restart lays what it wrote over the rest, the snapshot keeps the old bytes', async () => {
    const vdiId = (await createVdi(server.url, SIZE)).id;
    const original = seededBytes(SIZE, 43);
    const imp = await fetch(`${server.url}/v1/vdis/${vdiId}/contents?format=raw`, {
      method: 'PUT',
      body: new Uint8Array(original),
    });
    assert.equal(imp.status, 200);
    const snap = await api<{ id: string }>(server.url, 'POST', `/v1/vdis/${vdiId}/snapshots`, {});
    assert.equal(snap.status, 201);
    const ticket = await install(vdiId, ['write']);
    const patch = seededBytes(MiB + 4096, 44);
    const at = 3 * MiB - 4096;
    const put = await fetch(`${server.url}/images/${ticket}`, {
      method: 'PUT',
      headers: { 'content-range': `bytes ${at}-${at + patch.length - 1}/*` },
      body: new Uint8Array(patch),
    });
    assert.equal(put.status, 200);
    await killedFinalizing(ticket);
    const want = Buffer.from(original);
    patch.copy(want, at);
    assert.ok((await contents(vdiId)).equals(want), 'the VDI reads as its content with the write laid over');
    assert.ok((await contents(snap.body.id)).equals(original), 'the snapshot reads as before');
  });

  test('--imageio-socket serves /images/ (and only it) on a Unix socket, reported as unix_socket', async () => {
    const vdiId = (await createVdi(server.url, SIZE)).id;
    const ticket = await install(vdiId, ['write']);
    const tcp = (await (await fetch(`${server.url}/images/*`, { method: 'OPTIONS' })).json()) as {
      unix_socket?: string;
    };
    assert.equal(tcp.unix_socket, socketPath);
    const local = JSON.parse(
      (
        await curl(['--unix-socket', socketPath, '-X', 'OPTIONS', `http://localhost/images/${ticket}`])
      ).toString(),
    ) as { features: string[]; unix_socket: string };
    assert.ok(local.features.includes('zero'));
    assert.equal(local.unix_socket, socketPath);
    const data = path.join(dataDir, 'socket-data');
    const image = seededBytes(SIZE, 42);
    await fsp.writeFile(data, image);
    await curl([
      '--unix-socket',
      socketPath,
      '-X',
      'PUT',
      '--upload-file',
      data,
      `http://localhost/images/${ticket}`,
    ]);
    const { stdout: notServed } = await execFileP('curl', [
      '-sS',
      '--unix-socket',
      socketPath,
      '-o',
      '/dev/null',
      '-w',
      '%{http_code}',
      'http://localhost/v1/vdis',
    ]);
    assert.equal(notServed, '404', 'the management API is not on the socket');
    const fin = await api<{ status: string }>(
      server.url,
      'POST',
      `/v1/imageio/tickets/${ticket}/finalize?wait=60`,
    );
    assert.equal(fin.body.status, 'success');
    assert.ok((await contents(vdiId)).equals(image));
  });
});
