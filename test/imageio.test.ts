/**
 * ovirt-imageio compatibility: tickets installed under the management token,
 * and /images/{ticket} driven by a client written from imageio's
 * docs/images.md (test/helpers/imageio-client.ts), over real HTTP, with
 * qemu-img and python's hashlib as the outside judges.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { createWriteStream, promises as fsp } from 'node:fs';
import path from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { after, before, describe, test } from 'node:test';
import { api, execFileP } from './helpers/api.js';
import * as imageio from './helpers/imageio-client.js';
import { seededBytes, startServer, type TestServer, tempDir } from './helpers/server.js';
import { waitFor } from './helpers/wait.js';

const MiB = 1024 * 1024;
const TOKEN = 'management-secret';
const AUTH = { authorization: `Bearer ${TOKEN}` };
const GiB = 1024 * MiB;
/** Where the test source puts data: a few MiB in a sparse 2 GiB disk, some unaligned. */
const DATA_AT = [0, 3 * MiB + 4096, 700 * MiB, 1536 * MiB - 12_345, 2 * GiB - MiB];
const SIZE = 2 * GiB;

type TicketStatus = {
  uuid: string;
  active: boolean;
  canceled: boolean;
  connections: number;
  expires: number;
  idle_time: number;
  transferred: number;
  timeout: number;
  diskport: { transfer: string; task_id: string; state: string; vdi: string; ticket_state: string };
};
type Task = { id: string; status: string; error: { code: string; message: string } | null };

describe('ovirt-imageio tickets and /images/', () => {
  let srv: TestServer;
  let work: string;

  before(async () => {
    srv = await startServer({ token: TOKEN });
    work = await tempDir();
  });
  after(async () => {
    await srv.close();
    await fsp.rm(srv.dataDir, { recursive: true, force: true });
    await fsp.rm(work, { recursive: true, force: true });
  });

  async function vdi(size = SIZE): Promise<string> {
    const res = await api<{ id: string }>(
      srv.url,
      'POST',
      '/v1/vdis',
      { name_label: 'imageio', virtual_size: size },
      AUTH,
    );
    assert.equal(res.status, 201);
    return res.body.id;
  }

  async function install(
    vdiId: string,
    ops: string[],
    extra: Record<string, unknown> = {},
    size = SIZE,
  ): Promise<{ id: string; url: string; status: TicketStatus }> {
    const id = randomUUID();
    const res = await api<TicketStatus>(
      srv.url,
      'PUT',
      `/v1/imageio/tickets/${id}`,
      {
        uuid: id,
        size,
        url: `vdi:${vdiId}`,
        ops,
        timeout: 300,
        inactivity_timeout: 120,
        sparse: true,
        ...extra,
      },
      AUTH,
    );
    assert.equal(res.status, 200, JSON.stringify(res.body));
    return { id, url: `${srv.url}/images/${id}`, status: res.body };
  }

  async function finalize(id: string): Promise<Task> {
    const res = await api<Task>(
      srv.url,
      'POST',
      `/v1/imageio/tickets/${id}/finalize?wait=60`,
      undefined,
      AUTH,
    );
    assert.equal(res.status, 202, JSON.stringify(res.body));
    return res.body;
  }

  /** The VDI's bytes, through the management API (qcow2 for a big sparse disk). */
  async function exportTo(vdiId: string, file: string, format = 'raw'): Promise<void> {
    const res = await fetch(`${srv.url}/v1/vdis/${vdiId}/contents?format=${format}`, { headers: AUTH });
    assert.equal(res.status, 200);
    await pipeline(Readable.fromWeb(res.body as never), createWriteStream(file));
  }

  /** A sparse qcow2 with a few MiB of data, and its raw conversion made on the client side. */
  async function sparseSource(): Promise<{ qcow2: string; raw: string }> {
    const raw0 = path.join(work, `src-${randomUUID()}.raw`);
    const fd = await fsp.open(raw0, 'w');
    await fd.truncate(SIZE);
    for (const [i, at] of DATA_AT.entries()) {
      const len = Math.min(MiB + 777 * i, SIZE - at);
      await fd.write(seededBytes(len, 100 + i), 0, len, at);
    }
    await fd.close();
    const qcow2 = path.join(work, `src-${randomUUID()}.qcow2`);
    await execFileP('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw0, qcow2]);
    await fsp.rm(raw0);
    const raw = path.join(work, `client-${randomUUID()}.raw`);
    await execFileP('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', qcow2, raw]);
    return { qcow2, raw };
  }

  async function imagesStatus(
    url: string,
    init: RequestInit = {},
  ): Promise<{ status: number; body: string; headers: Headers }> {
    const res = await fetch(url, init);
    return { status: res.status, body: await res.text(), headers: res.headers };
  }

  test('OPTIONS /images/* reports every feature, a read ticket no PUT, PATCH, zero or flush', async () => {
    const all = await imageio.options(`${srv.url}/images/*`);
    assert.deepEqual(all.allow.sort(), ['GET', 'OPTIONS', 'PATCH', 'PUT']);
    assert.deepEqual(all.features.sort(), ['checksum', 'extents', 'flush', 'zero']);
    assert.ok((all.max_readers ?? 0) >= 4 && (all.max_writers ?? 0) >= 4);
    assert.equal(all.unix_socket, undefined);

    const id = await vdi(8 * MiB);
    const read = await install(id, ['read'], {}, 8 * MiB);
    const ro = await imageio.options(read.url);
    assert.deepEqual(ro.allow.sort(), ['GET', 'OPTIONS']);
    assert.ok(!ro.features.includes('zero') && !ro.features.includes('flush'));
    assert.ok(ro.features.includes('extents'));
    // What newer imageio servers report, and its client takes the size from.
    assert.equal(ro.virtual_size, 8 * MiB);
    assert.equal(ro.transfer_format, 'raw');
    // Write implies read, as in imageio: a write-only ticket offers GET and every feature.
    for (const ops of [['read', 'write'], ['write']]) {
      const write = await install(await vdi(8 * MiB), ops, {}, 8 * MiB);
      const rw = await imageio.options(write.url);
      assert.deepEqual(rw.allow.sort(), ['GET', 'OPTIONS', 'PATCH', 'PUT'], ops.join());
      assert.deepEqual(rw.features.sort(), ['checksum', 'extents', 'flush', 'zero']);
    }
    const algorithms = await fetch(`${srv.url}/images/*/checksum/algorithms`);
    assert.ok(((await algorithms.json()) as { algorithms: string[] }).algorithms.includes('blake2b'));
  });

  test('uploads a sparse qcow2 (converted to raw on the client) with 4 writers, zero for holes, flush=n and one flush; downloads it back by extents; qemu-img and blkhash agree', async () => {
    const { qcow2, raw } = await sparseSource();
    const id = await vdi();
    const up = await install(id, ['read', 'write']);
    const opts = await imageio.options(up.url);
    assert.ok(opts.features.includes('zero') && opts.features.includes('flush'));
    const ext = await imageio.localExtents(qcow2, 'qcow2');
    assert.ok(ext.some((e) => e.zero) && ext.some((e) => !e.zero));
    await imageio.upload(up.url, raw, ext, 4);

    const mid = await api<TicketStatus>(srv.url, 'GET', `/v1/imageio/tickets/${up.id}`, undefined, AUTH);
    assert.equal(mid.body.transferred, SIZE);
    assert.equal(mid.body.canceled, false);
    // The staged upload's blkhash (the imageio client verifies before finalizing), zero blocks unread.
    const expected = await imageio.localBlkhash(raw);
    assert.equal((await imageio.checksum(up.url)).checksum, expected);

    // The session under the ticket is a diskport transfer with a task.
    const transfers = await api<{ id: string }[]>(srv.url, 'GET', `/v1/transfers?vdi=${id}`, undefined, AUTH);
    assert.ok(transfers.body.some((t) => t.id === mid.body.diskport.transfer));
    const task = await finalize(up.id);
    assert.equal(task.status, 'success', JSON.stringify(task));
    assert.equal(task.id, mid.body.diskport.task_id);

    const stored = path.join(work, `stored-${randomUUID()}.qcow2`);
    await exportTo(id, stored, 'qcow2');
    await execFileP('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', stored, qcow2]);
    await execFileP('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', qcow2, stored]);

    const down = await install(id, ['read']);
    const got = path.join(work, `down-${randomUUID()}.raw`);
    const served = await imageio.download(down.url, got);
    assert.ok(served.every((e) => e.hole === false));
    assert.ok(served.filter((e) => !e.zero).reduce((n, e) => n + e.length, 0) < 16 * MiB);
    await execFileP('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', got, qcow2]);
    await execFileP('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', qcow2, got]);
    assert.equal((await imageio.checksum(down.url)).checksum, expected);
    for (const [algorithm, blockSize] of [
      ['sha256', 1 * MiB],
      ['blake2s', 16 * MiB],
    ] as const) {
      const sum = await imageio.checksum(down.url, `?algorithm=${algorithm}&block_size=${blockSize}`);
      assert.deepEqual(sum, {
        algorithm,
        block_size: blockSize,
        checksum: await imageio.localBlkhash(got, algorithm, blockSize),
      });
    }
    const done = await fetch(`${srv.url}/v1/imageio/tickets/${down.id}?finalize=true`, {
      method: 'DELETE',
      headers: AUTH,
    });
    assert.equal(done.status, 204);
  });

  test('a write ticket changes only what it writes: the rest keeps the VDI content, and nothing changes before finalize', async () => {
    const id = await vdi(8 * MiB);
    const before = seededBytes(8 * MiB, 7);
    const imp = await fetch(`${srv.url}/v1/vdis/${id}/contents?format=raw`, {
      method: 'PUT',
      headers: AUTH,
      body: new Uint8Array(before),
    });
    assert.equal(imp.status, 200);
    const t = await install(id, ['write'], {}, 8 * MiB);
    const patch = seededBytes(MiB, 8);
    let res = await fetch(t.url, {
      method: 'PUT',
      headers: { 'content-range': `bytes ${2 * MiB}-${3 * MiB - 1}/*` },
      body: new Uint8Array(patch),
    });
    assert.equal(res.status, 200);
    res = await fetch(t.url, {
      method: 'PATCH',
      body: JSON.stringify({ op: 'zero', offset: 5 * MiB, size: 4096, flush: true }),
    });
    assert.equal(res.status, 200);
    const file = path.join(work, `inplace-${randomUUID()}.raw`);
    await exportTo(id, file);
    assert.ok((await fsp.readFile(file)).equals(before), 'the VDI changes only at finalize');

    assert.equal((await finalize(t.id)).status, 'success');
    await exportTo(id, file);
    const want = Buffer.from(before);
    patch.copy(want, 2 * MiB);
    want.fill(0, 5 * MiB, 5 * MiB + 4096);
    assert.ok((await fsp.readFile(file)).equals(want));
  });

  async function vdiWith(content: Buffer, format = 'raw'): Promise<string> {
    const res = await api<{ id: string }>(
      srv.url,
      'POST',
      '/v1/vdis',
      { name_label: 'imageio', virtual_size: content.length, image_format: format },
      AUTH,
    );
    assert.equal(res.status, 201, JSON.stringify(res.body));
    const imp = await fetch(`${srv.url}/v1/vdis/${res.body.id}/contents?format=raw`, {
      method: 'PUT',
      headers: AUTH,
      body: new Uint8Array(content),
    });
    assert.equal(imp.status, 200);
    return res.body.id;
  }

  async function fileOf(bytes: Buffer): Promise<string> {
    const file = path.join(work, `bytes-${randomUUID()}.raw`);
    await fsp.writeFile(file, bytes);
    return file;
  }

  test('a read-write ticket reads the disk as written so far (committed content overlaid with its writes, flush=n ones too): GET, extents and checksum agree; the VDI changes only at finalize', async () => {
    const size = 8 * MiB;
    const before = Buffer.alloc(size);
    seededBytes(4 * MiB, 50).copy(before, 0);
    const id = await vdiWith(before);
    const t = await install(id, ['read', 'write'], {}, size);
    const fresh = seededBytes(MiB, 51);
    let res = await fetch(`${t.url}?flush=n`, {
      method: 'PUT',
      headers: { 'content-range': `bytes ${6 * MiB}-${7 * MiB - 1}/*` },
      body: new Uint8Array(fresh),
    });
    assert.equal(res.status, 200);
    res = await fetch(t.url, {
      method: 'PATCH',
      body: JSON.stringify({ op: 'zero', offset: MiB, size: MiB, flush: false }),
    });
    assert.equal(res.status, 200);
    const want = Buffer.from(before);
    fresh.copy(want, 6 * MiB);
    want.fill(0, MiB, 2 * MiB);

    const whole = await fetch(t.url);
    assert.equal(whole.status, 200);
    assert.ok(Buffer.from(await whole.arrayBuffer()).equals(want), 'GET sees the writes over the VDI');
    const part = await fetch(t.url, { headers: { range: `bytes=${6 * MiB - 10}-${6 * MiB + 9}` } });
    assert.equal(part.status, 206);
    assert.equal(part.headers.get('content-range'), `bytes ${6 * MiB - 10}-${6 * MiB + 9}/*`);
    assert.ok(Buffer.from(await part.arrayBuffer()).equals(want.subarray(6 * MiB - 10, 6 * MiB + 10)));
    assert.deepEqual(
      (await imageio.extents(t.url)).map((e) => [e.start / MiB, e.length / MiB, e.zero, e.hole]),
      [
        [0, 1, false, false],
        [1, 1, true, false],
        [2, 2, false, false],
        [4, 2, true, false],
        [6, 1, false, false],
        [7, 1, true, false],
      ],
    );
    assert.equal((await imageio.checksum(t.url)).checksum, await imageio.localBlkhash(await fileOf(want)));

    const file = path.join(work, `overlay-${randomUUID()}.raw`);
    await exportTo(id, file);
    assert.ok((await fsp.readFile(file)).equals(before), 'nothing reaches the VDI before finalize');
    assert.equal((await finalize(t.id)).status, 'success');
    await exportTo(id, file);
    assert.ok((await fsp.readFile(file)).equals(want));
  });

  test('a ticket smaller than its VDI sees the first size bytes: reads, extents and checksum end there, writes past it are 416, an upload leaves the rest of the VDI as it was', async () => {
    const size = 8 * MiB;
    const small = 3 * MiB;
    const before = seededBytes(size, 60);
    const id = await vdiWith(before);
    const read = await install(id, ['read'], {}, small);
    assert.equal((await imageio.options(read.url)).virtual_size, small);
    const whole = await fetch(read.url);
    assert.equal(whole.status, 200);
    assert.ok(Buffer.from(await whole.arrayBuffer()).equals(before.subarray(0, small)));
    let r = await imagesStatus(read.url, { headers: { range: `bytes=${small}-${small + 1}` } });
    assert.equal(r.status, 416);
    assert.equal(r.headers.get('content-range'), `bytes */${small}`);
    const ext = await imageio.extents(read.url);
    assert.equal(
      ext.reduce((n, e) => n + e.length, 0),
      small,
    );
    assert.equal(
      (await imageio.checksum(read.url)).checksum,
      await imageio.localBlkhash(await fileOf(before.subarray(0, small))),
    );
    await fetch(`${srv.url}/v1/imageio/tickets/${read.id}?finalize=true`, {
      method: 'DELETE',
      headers: AUTH,
    });

    const write = await install(id, ['write'], {}, small);
    r = await imagesStatus(write.url, {
      method: 'PUT',
      headers: { 'content-range': `bytes ${2 * MiB}-${4 * MiB - 1}/*` },
      body: new Uint8Array(2 * MiB),
    });
    assert.equal(r.status, 416);
    assert.equal(r.headers.get('content-range'), `bytes */${small}`);
    r = await imagesStatus(write.url, {
      method: 'PATCH',
      body: JSON.stringify({ op: 'zero', offset: 0, size: small + 1 }),
    });
    assert.equal(r.status, 416);
    const image = seededBytes(small, 61);
    const put = await fetch(write.url, { method: 'PUT', body: new Uint8Array(image) });
    assert.equal(put.status, 200);
    assert.equal((await finalize(write.id)).status, 'success');
    const file = path.join(work, `small-${randomUUID()}.raw`);
    await exportTo(id, file);
    const want = Buffer.from(before);
    image.copy(want, 0);
    assert.ok((await fsp.readFile(file)).equals(want));
  });

  test("extents say hole: true where the VDI's format leaves a range unallocated (qcow2, vhd at rest), never for raw, and not where a write ticket wrote", async () => {
    const size = 8 * MiB;
    const content = Buffer.alloc(size);
    seededBytes(2 * MiB, 70).copy(content, 2 * MiB);
    for (const format of ['raw', 'qcow2', 'vhd']) {
      const id = await vdiWith(content, format);
      const t = await install(id, ['read'], {}, size);
      const ext = await imageio.extents(t.url);
      assert.deepEqual(
        ext.map((e) => [e.start / MiB, e.length / MiB, e.zero, e.hole]),
        [
          [0, 2, true, format !== 'raw'],
          [2, 2, false, false],
          [4, 4, true, format !== 'raw'],
        ],
        format,
      );
    }
    const id = await vdiWith(content, 'qcow2');
    const w = await install(id, ['read', 'write'], {}, size);
    const res = await fetch(w.url, { method: 'PATCH', body: JSON.stringify({ op: 'zero', size: MiB }) });
    assert.equal(res.status, 200);
    assert.deepEqual(
      (await imageio.extents(w.url)).map((e) => [e.start / MiB, e.length / MiB, e.zero, e.hole]),
      [
        [0, 1, true, false],
        [1, 1, true, true],
        [2, 2, false, false],
        [4, 4, true, true],
      ],
    );
  });

  test('a ticket in use does not expire: every request pushes its deadline timeout seconds on, as in imageio; idle, it expires', async () => {
    const id = await vdi(MiB);
    const t = await install(id, ['read'], { timeout: 3 }, MiB);
    const started = Date.now();
    while (Date.now() - started < 5000) {
      const r = await imagesStatus(t.url, { headers: { range: 'bytes=0-0' } });
      assert.equal(r.status, 206, `${Date.now() - started} ms after install: ${r.body}`);
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
    await waitFor('the idle ticket to expire', async () => {
      const s = await api<TicketStatus>(srv.url, 'GET', `/v1/imageio/tickets/${t.id}`, undefined, AUTH);
      return s.body.diskport.ticket_state === 'expired';
    });
    const expired = await imagesStatus(t.url, { method: 'OPTIONS' });
    assert.equal(expired.status, 403);
    assert.match(expired.body, /expired/);
  });

  test('the last write of a byte wins: a client may zero the whole disk, then write its data over the zeros', async () => {
    const id = await vdi(4 * MiB);
    const t = await install(id, ['write'], {}, 4 * MiB);
    let res = await fetch(t.url, { method: 'PATCH', body: JSON.stringify({ op: 'zero', size: 4 * MiB }) });
    assert.equal(res.status, 200);
    const first = seededBytes(MiB, 30);
    const second = seededBytes(MiB, 31);
    for (const data of [first, second]) {
      res = await fetch(`${t.url}?flush=n`, {
        method: 'PUT',
        headers: { 'content-range': `bytes ${MiB}-${2 * MiB - 1}/*` },
        body: new Uint8Array(data),
      });
      assert.equal(res.status, 200);
    }
    res = await fetch(t.url, { method: 'PATCH', body: JSON.stringify({ op: 'flush' }) });
    assert.equal(res.status, 200);
    assert.equal((await finalize(t.id)).status, 'success');
    const file = path.join(work, `overwrite-${randomUUID()}.raw`);
    await exportTo(id, file);
    const want = Buffer.alloc(4 * MiB);
    second.copy(want, MiB);
    assert.ok((await fsp.readFile(file)).equals(want));
  });

  test('PUT of a whole image without Content-Range, then DELETE ?finalize=true commits it', async () => {
    const id = await vdi(4 * MiB);
    const t = await install(id, ['read', 'write'], {}, 4 * MiB);
    const image = seededBytes(4 * MiB, 9);
    const res = await fetch(t.url, { method: 'PUT', body: new Uint8Array(image) });
    assert.equal(res.status, 200);
    const del = await fetch(`${srv.url}/v1/imageio/tickets/${t.id}?finalize=true`, {
      method: 'DELETE',
      headers: AUTH,
    });
    assert.equal(del.status, 204);
    const file = path.join(work, `whole-${randomUUID()}.raw`);
    await exportTo(id, file);
    assert.ok((await fsp.readFile(file)).equals(image));
    const gone = await api(srv.url, 'GET', `/v1/imageio/tickets/${t.id}`, undefined, AUTH);
    assert.equal(gone.status, 404);
    assert.equal((gone.body as { error: { code: string } }).error.code, 'IMAGEIO_TICKET_NOT_FOUND');
  });

  test('a ranged GET answers 206 with Content-Range bytes s-e/*; the whole image without Range', async () => {
    const id = await vdi(2 * MiB);
    const image = seededBytes(2 * MiB, 10);
    await fetch(`${srv.url}/v1/vdis/${id}/contents?format=raw`, {
      method: 'PUT',
      headers: AUTH,
      body: new Uint8Array(image),
    });
    const t = await install(id, ['read'], {}, 2 * MiB);
    const part = await fetch(t.url, { headers: { range: 'bytes=4096-8191' } });
    assert.equal(part.status, 206);
    assert.equal(part.headers.get('content-range'), 'bytes 4096-8191/*');
    assert.ok(Buffer.from(await part.arrayBuffer()).equals(image.subarray(4096, 8192)));
    const whole = await fetch(t.url);
    assert.equal(whole.status, 200);
    assert.ok(Buffer.from(await whole.arrayBuffer()).equals(image));
    const status = await api<TicketStatus>(srv.url, 'GET', `/v1/imageio/tickets/${t.id}`, undefined, AUTH);
    assert.equal(status.body.transferred, 4096 + 2 * MiB);
    assert.equal(status.body.connections, 0);
  });

  test('errors as imageio clients expect them: 403 for a ticket that cannot be used, 416 with bytes */N, 400 for a bad request', async () => {
    const id = await vdi(MiB);
    const rw = await install(id, ['read', 'write'], {}, MiB);
    const ro = await install(await vdi(MiB), ['read'], {}, MiB);

    for (const init of [{}, { method: 'OPTIONS' }, { method: 'PUT', body: 'x' }]) {
      const r = await imagesStatus(`${srv.url}/images/no-such-ticket`, init);
      assert.equal(r.status, 403);
      assert.match(r.body, /IMAGEIO_TICKET_FORBIDDEN/);
      assert.match(r.body, /no such ticket no-such-ticket/);
    }
    let r = await imagesStatus(ro.url, { method: 'PUT', body: 'x' });
    assert.equal(r.status, 403, 'a read ticket forbids writes');
    assert.match(r.body, /forbids write/);
    for (const patch of [{ op: 'zero', size: 1 }, { op: 'flush' }]) {
      r = await imagesStatus(ro.url, { method: 'PATCH', body: JSON.stringify(patch) });
      assert.equal(r.status, 403, `a read ticket forbids ${patch.op}`);
    }
    for (const sub of ['/extents', '/checksum']) {
      r = await imagesStatus(`${srv.url}/images/no-such-ticket${sub}`);
      assert.equal(r.status, 403, sub);
      assert.match(r.body, /IMAGEIO_TICKET_FORBIDDEN/);
    }
    // A finished ticket is no longer usable, as imageio's docs say of a finished transfer.
    const done = await install(await vdi(MiB), ['read'], {}, MiB);
    assert.equal((await finalize(done.id)).status, 'success');
    r = await imagesStatus(done.url, { headers: { range: 'bytes=0-1' } });
    assert.equal(r.status, 403, 'a finalized ticket');
    r = await imagesStatus(rw.url, { headers: { range: 'bytes=0-1' } });
    assert.equal(r.status, 206, 'a write ticket reads back');
    r = await imagesStatus(rw.url, { headers: { range: `bytes=${MiB}-` } });
    assert.equal(r.status, 416, 'a read through a write ticket is bounded by its size too');
    assert.equal(r.headers.get('content-range'), `bytes */${MiB}`);

    r = await imagesStatus(rw.url, {
      method: 'PUT',
      headers: { 'content-range': `bytes ${MiB - 2}-${MiB + 1}/*` },
      body: 'abcd',
    });
    assert.equal(r.status, 416);
    assert.equal(r.headers.get('content-range'), `bytes */${MiB}`);
    r = await imagesStatus(rw.url, {
      method: 'PATCH',
      body: JSON.stringify({ op: 'zero', offset: MiB, size: 1 }),
    });
    assert.equal(r.status, 416);
    assert.equal(r.headers.get('content-range'), `bytes */${MiB}`);
    r = await imagesStatus(ro.url, { headers: { range: `bytes=${MiB}-${MiB + 10}` } });
    assert.equal(r.status, 416);
    assert.equal(r.headers.get('content-range'), `bytes */${MiB}`);
    r = await imagesStatus(ro.url, { headers: { range: 'bytes=0-1,4-5' } });
    assert.equal(r.status, 416, 'one range per GET');

    r = await imagesStatus(rw.url, { method: 'PATCH', body: JSON.stringify({ op: 'zero', offset: 4096 }) });
    assert.equal(r.status, 400);
    assert.match(r.body, /Missing required value for 'size'/);
    r = await imagesStatus(rw.url, { method: 'PATCH', body: JSON.stringify({ op: 'trim', size: 1 }) });
    assert.equal(r.status, 400);
    for (const bad of [
      { size: -1 },
      { size: 1.5 },
      { size: '1' },
      { size: 1, offset: -4096 },
      { size: 1, flush: 'y' },
    ]) {
      r = await imagesStatus(rw.url, { method: 'PATCH', body: JSON.stringify({ op: 'zero', ...bad }) });
      assert.equal(r.status, 400, JSON.stringify(bad));
      assert.match(r.body, /Invalid value for '(size|offset|flush)'/);
    }
    r = await imagesStatus(rw.url, { method: 'PATCH', body: 'not json' });
    assert.equal(r.status, 400);
    r = await imagesStatus(rw.url, {
      method: 'PUT',
      headers: { 'content-range': 'bytes 5-2/*' },
      body: 'abcd',
    });
    assert.equal(r.status, 400);
    r = await imagesStatus(`${rw.url}?flush=maybe`, { method: 'PUT', body: 'abcd' });
    assert.equal(r.status, 400);
    r = await imagesStatus(`${ro.url}/extents?context=bitmap`);
    assert.equal(r.status, 400);
    r = await imagesStatus(`${ro.url}/extents?context=dirty`);
    assert.equal(r.status, 404);
    assert.match(r.body, /DIRTY_EXTENTS_UNAVAILABLE/);
    r = await imagesStatus(`${ro.url}/checksum?block_size=1000`);
    assert.equal(r.status, 400);
    r = await imagesStatus(`${ro.url}/checksum?block_size=${64 * MiB}`);
    assert.equal(r.status, 400);
    r = await imagesStatus(`${ro.url}/checksum?algorithm=crc32`);
    assert.equal(r.status, 400);
    assert.match(r.body, /UNSUPPORTED_CHECKSUM_ALGORITHM/);
    r = await imagesStatus(`${rw.url}/checksum`);
    assert.equal(r.status, 200, 'the checksum of a write ticket is that of the disk as written so far');
    r = await imagesStatus(`${rw.url}/extents?context=dirty`);
    assert.equal(r.status, 404, 'a write ticket has no dirty extents');
    // The body of every error is JSON whose first 512 bytes (what imageio's client shows) carry the message.
    r = await imagesStatus(`${srv.url}/images/no-such-ticket`);
    const body = JSON.parse(r.body) as { error: { code: string; message: string } };
    assert.ok(r.body.slice(0, 512).includes(body.error.message));
  });

  test('the management side: token required, bad tickets refused, PATCH extends, ids used once', async () => {
    const id = await vdi(MiB);
    const t = randomUUID();
    const body = { uuid: t, size: MiB, url: `vdi:${id}`, ops: ['read'], timeout: 60 };
    assert.equal((await api(srv.url, 'PUT', `/v1/imageio/tickets/${t}`, body)).status, 401);
    for (const bad of [
      { ...body, url: `file:///etc/passwd` },
      { ...body, size: 2 * MiB },
      { ...body, ops: ['delete'] },
      { ...body, timeout: 'soon' },
      { ...body, uuid: 'another' },
      { ...body, dirty: true },
    ]) {
      const res = await api(srv.url, 'PUT', `/v1/imageio/tickets/${t}`, bad, AUTH);
      assert.equal(res.status, 400, JSON.stringify(bad));
    }
    const missing = await api(srv.url, 'PUT', `/v1/imageio/tickets/${t}`, { ...body, url: 'vdi:nope' }, AUTH);
    assert.equal(missing.status, 404);
    assert.equal((await api(srv.url, 'PUT', `/v1/imageio/tickets/${t}`, body, AUTH)).status, 200);
    const again = await api(srv.url, 'PUT', `/v1/imageio/tickets/${t}`, body, AUTH);
    assert.equal(again.status, 409);
    assert.equal((again.body as { error: { code: string } }).error.code, 'IMAGEIO_TICKET_EXISTS');

    const before = (await api<TicketStatus>(srv.url, 'GET', `/v1/imageio/tickets/${t}`, undefined, AUTH))
      .body;
    const extended = await api<TicketStatus>(
      srv.url,
      'PATCH',
      `/v1/imageio/tickets/${t}`,
      { timeout: 3600 },
      AUTH,
    );
    assert.equal(extended.status, 200);
    assert.ok(extended.body.expires >= before.expires + 3000);
    assert.equal(extended.body.timeout, 3600);
    assert.equal((await api(srv.url, 'PATCH', `/v1/imageio/tickets/${t}`, {}, AUTH)).status, 400);
    assert.equal((await api(srv.url, 'GET', '/v1/imageio/tickets/unknown', undefined, AUTH)).status, 404);
    // Deleting what is not there is done already, as in imageio.
    const del = await fetch(`${srv.url}/v1/imageio/tickets/unknown`, { method: 'DELETE', headers: AUTH });
    assert.equal(del.status, 204);
  });

  test('an incremental backup through a dirty ticket: full download, writes, dirty download of only the changed extents, restore equals the live disk', async () => {
    const size = 16 * MiB;
    const id = await vdi(size);
    const base = Buffer.alloc(size);
    seededBytes(4 * MiB, 20).copy(base, 0);
    seededBytes(2 * MiB, 21).copy(base, 10 * MiB);
    const imp = await fetch(`${srv.url}/v1/vdis/${id}/contents?format=raw`, {
      method: 'PUT',
      headers: AUTH,
      body: new Uint8Array(base),
    });
    assert.equal(imp.status, 200);
    const snap1 = await api<{ id: string }>(srv.url, 'POST', `/v1/vdis/${id}/snapshots`, {}, AUTH);
    assert.equal(snap1.status, 201, JSON.stringify(snap1.body));

    // The full backup.
    const full = await install(id, ['read'], {}, size);
    const backup = path.join(work, `backup-${randomUUID()}.raw`);
    await imageio.download(full.url, backup);
    assert.equal(
      (
        await fetch(`${srv.url}/v1/imageio/tickets/${full.id}?finalize=true`, {
          method: 'DELETE',
          headers: AUTH,
        })
      ).status,
      204,
    );

    // The guest writes: new data in a hole, zeros over data, one identical rewrite.
    const w = await install(id, ['write'], {}, size);
    const fresh = seededBytes(MiB, 22);
    let res = await fetch(w.url, {
      method: 'PUT',
      headers: { 'content-range': `bytes ${6 * MiB}-${7 * MiB - 1}/*` },
      body: new Uint8Array(fresh),
    });
    assert.equal(res.status, 200);
    res = await fetch(w.url, {
      method: 'PATCH',
      body: JSON.stringify({ op: 'zero', offset: 10 * MiB, size: MiB, flush: true }),
    });
    assert.equal(res.status, 200);
    res = await fetch(w.url, {
      method: 'PUT',
      headers: { 'content-range': `bytes 0-${MiB - 1}/*` },
      body: new Uint8Array(base.subarray(0, MiB)),
    });
    assert.equal(res.status, 200);
    assert.equal((await finalize(w.id)).status, 'success');

    // The incremental: only what changed since snapshot 1.
    const inc = await install(id, ['read'], { dirty: true, url: `vdi:${id}?since=${snap1.body.id}` }, size);
    const dirty = await imageio.extents(inc.url, 'dirty');
    assert.equal(
      dirty.reduce((n, e) => n + e.length, 0),
      size,
    );
    const changed = (dirty as (imageio.ClientExtent & { dirty: boolean })[]).filter((e) => e.dirty);
    assert.deepEqual(
      changed.map((e) => [e.start, e.length, e.zero]),
      [
        [6 * MiB, MiB, false],
        [10 * MiB, MiB, true],
      ],
    );
    const fd = await fsp.open(backup, 'r+');
    for (const e of changed) {
      if (e.zero) {
        await fd.write(Buffer.alloc(e.length), 0, e.length, e.start);
        continue;
      }
      const part = await fetch(inc.url, { headers: { range: `bytes=${e.start}-${e.start + e.length - 1}` } });
      assert.equal(part.status, 206);
      await fd.write(Buffer.from(await part.arrayBuffer()), 0, e.length, e.start);
    }
    await fd.close();
    const live = path.join(work, `live-${randomUUID()}.raw`);
    await exportTo(id, live);
    await execFileP('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', backup, live]);

    // A ticket that is not part of an incremental backup has no dirty extents.
    const r = await imagesStatus(
      `${full.url.replace(full.id, (await install(id, ['read'], {}, size)).id)}/extents?context=dirty`,
    );
    assert.equal(r.status, 404);
    assert.match(r.body, /DIRTY_EXTENTS_UNAVAILABLE/);
    // since must name a snapshot of this VDI.
    const other = await vdi(size);
    const bad = await api(
      srv.url,
      'PUT',
      `/v1/imageio/tickets/${randomUUID()}`,
      { size, url: `vdi:${other}?since=${snap1.body.id}`, ops: ['read'], timeout: 60, dirty: true },
      AUTH,
    );
    assert.equal(bad.status, 409);
  });

  test('a ticket past its timeout is refused with 403 and its upload leaves the VDI as it was', async () => {
    const id = await vdi(MiB);
    const t = await install(id, ['write'], { timeout: 1 }, MiB);
    const res = await fetch(t.url, {
      method: 'PUT',
      headers: { 'content-range': 'bytes 0-3/*' },
      body: 'data',
    });
    assert.equal(res.status, 200);
    // Asked through the management API: a request on the ticket would push its deadline on.
    await waitFor('the ticket to expire', async () => {
      const s = await api<TicketStatus>(srv.url, 'GET', `/v1/imageio/tickets/${t.id}`, undefined, AUTH);
      return s.body.diskport.ticket_state === 'expired';
    });
    const status = await imagesStatus(t.url, { method: 'OPTIONS' });
    assert.equal(status.status, 403);
    assert.match(status.body, /expired/);
    const transfer = await api<{ state: string }>(
      srv.url,
      'GET',
      `/v1/transfers/${t.status.diskport.transfer}`,
      undefined,
      AUTH,
    );
    assert.equal(transfer.body.state, 'expired');
    const file = path.join(work, `expired-${randomUUID()}.raw`);
    await exportTo(id, file);
    assert.ok((await fsp.readFile(file)).equals(Buffer.alloc(MiB)));
  });

  test('a ticket idle past its inactivity_timeout is refused with 403', async () => {
    const id = await vdi(MiB);
    const t = await install(id, ['write'], { timeout: 3600, inactivity_timeout: 1 }, MiB);
    // Asked through the management API, which is no activity of the ticket's.
    await waitFor('the idle ticket to expire', async () => {
      const s = await api<TicketStatus>(srv.url, 'GET', `/v1/imageio/tickets/${t.id}`, undefined, AUTH);
      return s.body.diskport.state === 'expired';
    });
    const r = await imagesStatus(t.url, { method: 'OPTIONS' });
    assert.equal(r.status, 403);
    assert.match(r.body, /expired/);
    // The VDI is free for the next ticket.
    await install(id, ['write'], {}, MiB);
  });

  test('DELETE cancels an upload in the middle of a PUT: the request ends, the VDI is unchanged, the ticket is gone', async () => {
    const id = await vdi(8 * MiB);
    const original = seededBytes(8 * MiB, 11);
    await fetch(`${srv.url}/v1/vdis/${id}/contents?format=raw`, {
      method: 'PUT',
      headers: AUTH,
      body: new Uint8Array(original),
    });
    const t = await install(id, ['write'], {}, 8 * MiB);
    // A PUT that sends half its body, then stalls.
    let stall: () => void = () => {};
    const body = new ReadableStream<Uint8Array>({
      start(c) {
        c.enqueue(seededBytes(2 * MiB, 12));
      },
      pull: () =>
        new Promise<void>((r) => {
          stall = r;
        }),
    });
    const put = fetch(t.url, {
      method: 'PUT',
      headers: { 'content-range': `bytes 0-${4 * MiB - 1}/*`, 'content-length': String(4 * MiB) },
      body,
      duplex: 'half',
    } as RequestInit).then(
      (r) => r.status,
      () => 'reset',
    );
    await waitFor('the PUT to be in flight', async () => {
      const s = await api<TicketStatus>(srv.url, 'GET', `/v1/imageio/tickets/${t.id}`, undefined, AUTH);
      return s.body.connections === 1 && s.body.active;
    });
    const del = await fetch(`${srv.url}/v1/imageio/tickets/${t.id}`, { method: 'DELETE', headers: AUTH });
    assert.equal(del.status, 204);
    stall();
    assert.notEqual(await put, 200);
    const r = await imagesStatus(t.url, { method: 'OPTIONS' });
    assert.equal(r.status, 403);
    assert.match(r.body, /canceled/);
    assert.equal((await api(srv.url, 'GET', `/v1/imageio/tickets/${t.id}`, undefined, AUTH)).status, 404);
    const file = path.join(work, `cancel-${randomUUID()}.raw`);
    await exportTo(id, file);
    assert.ok((await fsp.readFile(file)).equals(original));
    const task = await api<Task>(srv.url, 'GET', `/v1/tasks/${t.status.diskport.task_id}`, undefined, AUTH);
    assert.equal(task.body.status, 'cancelled');
  });
});
