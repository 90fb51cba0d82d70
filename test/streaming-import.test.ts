/**
 * vhd and qcow2 uploads into a raw VDI convert as they arrive: plain data
 * goes straight into the disk, the rest is staged and converted at the end.
 * These tests send images whose layout defeats the streaming in each way it
 * can be defeated, and check that the disk is still exactly right.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { vhdChecksum } from '../src/formats/vhd/format.js';
import { api, createVdi, curl, execFileP, sha256Url } from './helpers/api.js';
import { failNthDirectWrite } from './helpers/faults.js';
import { codecDisk } from './helpers/images.js';
import { prng, seededBytes, spawnServer, startServer, type TestServer, tempDir } from './helpers/server.js';
import { waitFor } from './helpers/wait.js';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;
const CLUSTER = 64 * 1024;

interface TaskJson {
  status: string;
  result: { bytes_streamed?: number; bytes_received: number };
  error?: { code: string; message: string };
}

interface TransferJson {
  id: string;
  url: string;
  token: string;
  task_id: string;
}

/** `url` on the server at `base` (a restarted server listens elsewhere but keeps its sessions). */
const at = (url: string, base: string) => url.replace(/^http:\/\/[^/]+/, base);

async function openUpload(base: string, vdi: string, format: string, size: number) {
  const res = await api<TransferJson>(base, 'POST', '/v1/transfers', {
    vdi,
    direction: 'upload',
    format,
    size,
  });
  assert.equal(res.status, 201, JSON.stringify(res.body));
  return { ...res.body, url: at(res.body.url, base) };
}

/** Sends bytes [s, e) of `img` as one chunk; it must be accepted. */
async function putRange(url: string, img: Buffer, s: number, e: number): Promise<void> {
  const res = await fetch(url, {
    method: 'PUT',
    headers: { 'content-range': `bytes ${s}-${e - 1}/${img.length}` },
    body: new Uint8Array(img.subarray(s, e)),
  });
  assert.equal(res.status, 200, await res.text());
}

function finalize(base: string, t: TransferJson) {
  return api<TaskJson>(base, 'POST', `/v1/transfers/${t.id}/finalize?token=${t.token}&wait=60`);
}

/** Footer fields (VHD specification, "Hard Disk Footer Format"). */
const F = { creator: 28, currentSize: 48, cylinders: 56, diskType: 60, checksum: 64 };

function setFooterChecksum(footer: Buffer): void {
  footer.writeUInt32BE(vhdChecksum(footer, F.checksum), F.checksum);
}

function sha256(buf: Buffer): string {
  return createHash('sha256').update(buf).digest('hex');
}

/** The bytes that mark the data clusters of a bad first attempt. */
const BAD_BYTE = 0x5a;

/**
 * A qcow2 image of 4 KiB clusters with other bytes (BAD_BYTE) in its data
 * clusters stored at host offsets [from, to), and the guest range they map to.
 */
function withBadClusters(good: Buffer, from: number, to: number): { bad: Buffer; guest: [number, number] } {
  const bad = Buffer.from(good);
  const MASK = 0x00fffffffffffe00n;
  const l1 = Number(good.readBigUInt64BE(40));
  const guest: [number, number] = [Number.POSITIVE_INFINITY, 0];
  for (let i = 0; i < 8; i++) {
    const table = Number(good.readBigUInt64BE(l1 + i * 8) & MASK);
    for (let j = 0; table && j < 512; j++) {
      const h = Number(good.readBigUInt64BE(table + j * 8) & MASK);
      if (h < from || h + 4096 > to) continue;
      bad.fill(BAD_BYTE, h, h + 4096);
      const g = (i * 512 + j) * 4096;
      guest[0] = Math.min(guest[0], g);
      guest[1] = Math.max(guest[1], g + 4096);
    }
  }
  assert.ok(guest[1] > 0, 'the image has data clusters in the range');
  return { bad, guest };
}

/**
 * Whether bytes of the bad attempt have streamed into the disk being built
 * for transfer `t`: a whole cluster of BAD_BYTE in the guest range they map to.
 */
async function badBytesStreamed(dataDir: string, t: TransferJson, guest: [number, number]): Promise<boolean> {
  const dest = path.join(dataDir, 'srs', 'local', '.staging', `transfer-${t.id}.qcow2.raw`);
  const handle = await fsp.open(dest).catch(() => null);
  if (!handle) return false;
  try {
    const { buffer, bytesRead } = await handle.read(
      Buffer.alloc(guest[1] - guest[0]),
      0,
      guest[1] - guest[0],
      guest[0],
    );
    return buffer.subarray(0, bytesRead).includes(Buffer.alloc(4096, BAD_BYTE));
  } finally {
    await handle.close();
  }
}

/** Bytes a session counts as received, read from the list (which waits for no write to end). */
async function bytesReceived(base: string, vdi: string): Promise<number> {
  const [state] = (await api<{ bytes_received: number }[]>(base, 'GET', `/v1/transfers?vdi=${vdi}`)).body;
  return state.bytes_received;
}

/**
 * These races are lost when a checkpoint (once a second while a chunk
 * lands) counts the bad bytes before the test's next step: a loaded machine
 * can take that long. The attempt then says so, and the test runs it again.
 */
const RACE_ATTEMPTS = 3;

describe('vhd and qcow2 uploads convert into the disk as they arrive', () => {
  let srv: TestServer;
  let dir: string;
  let raw: Buffer;
  let rawFile: string;

  before(async () => {
    srv = await startServer();
    dir = await tempDir();
    raw = Buffer.alloc(SIZE);
    for (let i = 0; i < 6; i++) seededBytes(700 * 1024, 40 + i).copy(raw, i * (SIZE / 6) + i * 4096);
    rawFile = path.join(dir, 'disk.raw');
    await fsp.writeFile(rawFile, raw);
  });
  after(async () => {
    await srv.close();
    await fsp.rm(dir, { recursive: true, force: true });
  });

  async function qemuImage(name: string, args: string[]): Promise<string> {
    const file = path.join(dir, name);
    await execFileP('qemu-img', ['convert', '-f', 'raw', ...args, rawFile, file]);
    return file;
  }

  async function put(
    vdiId: string,
    file: string,
    format: string,
  ): Promise<{ status: number; body: TaskJson }> {
    const res = await fetch(`${srv.url}/v1/vdis/${vdiId}/contents?format=${format}`, {
      method: 'PUT',
      body: new Uint8Array(await fsp.readFile(file)),
    });
    return { status: res.status, body: (await res.json()) as TaskJson };
  }

  async function vdiBytes(vdiId: string): Promise<Buffer> {
    return curl([`${srv.url}/v1/vdis/${vdiId}/contents`]);
  }

  test('a qcow2 whose L2 table comes after the data it maps: that data is staged, and the disk is exact', async () => {
    const file = await qemuImage('l2-late.qcow2', ['-O', 'qcow2', '-o', 'cluster_size=65536']);
    const img = await fsp.readFile(file);
    // Swap the L2 table with the data cluster in the middle of those it maps:
    // the first half of the data now arrives before the table that maps it.
    const l1 = Number(img.readBigUInt64BE(40));
    const FLAGS = 0xc000000000000000n;
    const l2 = Number(img.readBigUInt64BE(l1) & ~FLAGS);
    const mapped: [number, number][] = [];
    for (let j = 0; j < CLUSTER / 8; j++) {
      const host = Number(img.readBigUInt64BE(l2 + j * 8) & 0x00fffffffffffe00n);
      if (host) mapped.push([j, host]);
    }
    mapped.sort((a, b) => a[1] - b[1]);
    const [last, lastHost] = mapped[mapped.length >> 1];
    assert.ok(lastHost > l2, 'qemu-img put the table before its data');
    const table = Buffer.from(img.subarray(l2, l2 + CLUSTER));
    const data = Buffer.from(img.subarray(lastHost, lastHost + CLUSTER));
    table.writeBigUInt64BE((table.readBigUInt64BE(last * 8) & FLAGS) | BigInt(l2), last * 8);
    data.copy(img, l2);
    table.copy(img, lastHost);
    img.writeBigUInt64BE((img.readBigUInt64BE(l1) & FLAGS) | BigInt(lastHost), l1);
    await fsp.writeFile(file, img);
    await execFileP('qemu-img', ['check', '-f', 'qcow2', file]);
    await execFileP('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', rawFile, file]);

    const vdi = await createVdi(srv.url, SIZE);
    const { status, body } = await put(vdi.id, file, 'qcow2');
    assert.equal(status, 200, JSON.stringify(body));
    const streamed = body.result.bytes_streamed ?? 0;
    const dataBytes = mapped.length * CLUSTER;
    assert.ok(streamed > dataBytes / 4, `data after the table streamed (${streamed} bytes)`);
    assert.ok(streamed < (dataBytes * 3) / 4, `data before the table was staged (${streamed} streamed)`);
    assert.equal(sha256(await vdiBytes(vdi.id)), sha256(raw));
  });

  test('a VHD whose trailing footer disagrees with its copy at offset 0 is refused; the VDI is unchanged', async () => {
    const file = await qemuImage('disagree.vhd', ['-O', 'vpc']);
    const img = await fsp.readFile(file);
    const tail = img.subarray(img.length - 512);
    tail.writeUInt16BE(tail.readUInt16BE(F.cylinders) + 1, F.cylinders);
    setFooterChecksum(tail);
    await fsp.writeFile(file, img);
    const vdi = await createVdi(srv.url, 2 * SIZE);
    const before = await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`);
    const { status, body } = await put(vdi.id, file, 'vhd');
    assert.equal(status, 400, JSON.stringify(body));
    assert.equal(body.error?.code, 'MALFORMED_IMAGE');
    assert.match(
      body.error?.message ?? '',
      /footer at the end of the file and its copy at offset 0 disagree/,
    );
    assert.equal(await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`), before);
    const rec = (await api<{ generation: number }>(srv.url, 'GET', `/v1/vdis/${vdi.id}`)).body;
    assert.equal(rec.generation, 0);
  });

  test('a dynamic VHD with a damaged footer copy at offset 0 still imports from its trailing footer', async () => {
    const file = await qemuImage('damaged-head.vhd', ['-O', 'vpc']);
    const img = await fsp.readFile(file);
    img.writeUInt32BE((img.readUInt32BE(F.checksum) ^ 1) >>> 0, F.checksum);
    await fsp.writeFile(file, img);
    const vdi = await createVdi(srv.url, 2 * SIZE);
    const { status, body } = await put(vdi.id, file, 'vhd');
    assert.equal(status, 200, JSON.stringify(body));
    assert.equal(body.result.bytes_streamed, 0, 'nothing was streamed on a footer copy it could not trust');
    assert.equal(sha256((await vdiBytes(vdi.id)).subarray(0, SIZE)), sha256(raw));
  });

  test('a fixed VHD whose data runs past its current size: the VDI reads zeros there', async () => {
    const file = await qemuImage('short.vhd', ['-O', 'vpc', '-o', 'subformat=fixed,force_size=on']);
    const img = await fsp.readFile(file);
    const footer = img.subarray(img.length - 512);
    // Hyper-V's creator makes current_size authoritative; half the disk is left past it.
    footer.write('win ', F.creator, 'latin1');
    footer.writeBigUInt64BE(BigInt(SIZE / 2), F.currentSize);
    setFooterChecksum(footer);
    await fsp.writeFile(file, img);
    const vdi = await createVdi(srv.url, SIZE);
    const { status, body } = await put(vdi.id, file, 'vhd');
    assert.equal(status, 200, JSON.stringify(body));
    assert.ok((body.result.bytes_streamed ?? 0) >= SIZE - 1024, 'a fixed disk streams whole');
    const disk = await vdiBytes(vdi.id);
    assert.equal(sha256(disk.subarray(0, SIZE / 2)), sha256(raw.subarray(0, SIZE / 2)));
    assert.ok(
      disk.subarray(SIZE / 2).every((b) => b === 0),
      'nothing past the image survives',
    );
  });

  for (const format of ['vhd', 'qcow2'] as const) {
    test(`a ${format} session sent in shuffled parallel chunks, with zero ops over its holes, is exact`, async () => {
      const file = await qemuImage(`chunks.${format}`, ['-O', format === 'vhd' ? 'vpc' : 'qcow2']);
      const img = await fsp.readFile(file);
      const vdi = await createVdi(srv.url, 2 * SIZE);
      const t = await openUpload(srv.url, vdi.id, format, img.length);
      const url = t.url;
      const CHUNK = 256 * 1024;
      const chunks: number[] = [];
      for (let s = 0; s < img.length; s += CHUNK) chunks.push(s);
      // The first half in order (it streams), the rest shuffled (it is staged).
      const rnd = prng(format.length);
      const tail = chunks.splice(chunks.length / 2);
      for (let i = tail.length - 1; i > 0; i--) {
        const j = Math.floor(rnd() * (i + 1));
        [tail[i], tail[j]] = [tail[j], tail[i]];
      }
      const send = async (s: number) => {
        const e = Math.min(img.length, s + CHUNK);
        const part = img.subarray(s, e);
        if (part.every((b) => b === 0)) {
          const res = await fetch(url, {
            method: 'PATCH',
            headers: { 'content-type': 'application/json' },
            body: JSON.stringify({ op: 'zero', offset: s, size: e - s }),
          });
          assert.equal(res.status, 200, await res.text());
          return;
        }
        await putRange(url, img, s, e);
      };
      for (const s of chunks) await send(s);
      for (let i = 0; i < tail.length; i += 4) await Promise.all(tail.slice(i, i + 4).map(send));
      const fin = await finalize(srv.url, t);
      assert.equal(fin.body.status, 'success', JSON.stringify(fin.body));
      assert.ok((fin.body.result.bytes_streamed ?? 0) > 0, 'the in-order half streamed');
      assert.equal(sha256((await vdiBytes(vdi.id)).subarray(0, SIZE)), sha256(raw));
      const staging = await fsp.readdir(path.join(srv.dataDir, 'srs', 'local', '.staging'));
      assert.deepEqual(staging, [], 'neither the staging file nor the disk being built outlives the session');
    });
  }

  test('a cancelled streaming upload leaves the VDI as it was and removes the disk being built', async () => {
    const file = await qemuImage('cancel.qcow2', ['-O', 'qcow2']);
    const img = await fsp.readFile(file);
    const vdi = await createVdi(srv.url, SIZE);
    const t = await openUpload(srv.url, vdi.id, 'qcow2', img.length);
    const url = t.url;
    const half = Math.floor(img.length / 2);
    const res = await fetch(url, {
      method: 'PUT',
      headers: { 'content-range': `bytes 0-${half - 1}/${img.length}` },
      body: new Uint8Array(img.subarray(0, half)),
    });
    assert.equal(res.status, 200);
    const staging = path.join(srv.dataDir, 'srs', 'local', '.staging');
    assert.ok(
      (await fsp.readdir(staging)).some((n) => n.endsWith('.raw')),
      'the disk is being built',
    );
    const cancel = await api(srv.url, 'POST', `/v1/tasks/${t.task_id}/cancel`);
    assert.ok(cancel.status < 300, JSON.stringify(cancel.body));
    const task = (await api<TaskJson>(srv.url, 'GET', `/v1/tasks/${t.task_id}?wait=30`)).body;
    assert.equal(task.status, 'cancelled');
    // The files go right after the task ends (the VDI is free first).
    await waitFor(
      'the disk being built to be removed',
      async () => (await fsp.readdir(staging)).length === 0,
    );
    assert.ok(
      (await vdiBytes(vdi.id)).every((b) => b === 0),
      'the VDI is still empty',
    );
  });

  for (const format of ['vhd', 'qcow2'] as const) {
    test(`after a kill -9, a ${format} session sent in shuffled chunks resumes to the exact disk`, async () => {
      // Some chunks stream into the disk before the kill; after it, nothing
      // says which, and a 4 KiB block can hold streamed and staged bytes.
      // Dense data: chunk edges fall inside it, between streamed and staged bytes.
      const dense = seededBytes(8 * MiB, 1002);
      const denseFile = path.join(dir, `dense-${format}.raw`);
      await fsp.writeFile(denseFile, dense);
      const file = `${denseFile}.${format}`;
      await execFileP('qemu-img', [
        'convert',
        '-f',
        'raw',
        '-O',
        format === 'vhd' ? 'vpc' : 'qcow2',
        denseFile,
        file,
      ]);
      const img = await fsp.readFile(file);
      const dataDir = await tempDir();
      let server = await spawnServer(dataDir);
      try {
        for (const seed of [4, 7, 11]) {
          const rnd = prng(seed);
          const vdi = await createVdi(server.url, 2 * SIZE);
          const t = await openUpload(server.url, vdi.id, format, img.length);
          const CHUNK = MiB;
          const order = [...Array(Math.ceil(img.length / CHUNK)).keys()].sort(() => rnd() - 0.5);
          const killAt = 1 + Math.floor(rnd() * (order.length - 2));
          for (const [n, k] of order.entries()) {
            if (n === killAt) {
              await server.stop('SIGKILL');
              server = await spawnServer(dataDir);
            }
            const [s, e] = [k * CHUNK, Math.min(img.length, (k + 1) * CHUNK)];
            await putRange(at(t.url, server.url), img, s, e);
          }
          const fin = await finalize(server.url, t);
          assert.equal(fin.body.status, 'success', JSON.stringify(fin.body));
          const disk = await curl([`${server.url}/v1/vdis/${vdi.id}/contents`]);
          assert.equal(
            sha256(disk.subarray(0, dense.length)),
            sha256(dense),
            `seed ${seed}: the disk is exact`,
          );
        }
      } finally {
        await server.stop();
        await fsp.rm(dataDir, { recursive: true, force: true });
      }
    });
  }

  async function refusedUnchanged(vdiId: string, res: { status: number; body: TaskJson }, message: RegExp) {
    assert.equal(res.status, 400, JSON.stringify(res.body));
    assert.equal(res.body.error?.code, 'MALFORMED_IMAGE');
    assert.match(res.body.error?.message ?? '', message);
    const rec = (await api<{ generation: number }>(srv.url, 'GET', `/v1/vdis/${vdiId}`)).body;
    assert.equal(rec.generation, 0, 'the VDI is unchanged');
  }

  test('a qcow2 data cluster used by two guest clusters is refused, even once it has streamed', async () => {
    const file = await qemuImage('shared.qcow2', ['-O', 'qcow2', '-o', 'cluster_size=4096']);
    const img = await fsp.readFile(file);
    const MASK = 0x00fffffffffffe00n;
    const l1 = Number(img.readBigUInt64BE(40));
    const tableOf = (i: number) => Number(img.readBigUInt64BE(l1 + i * 8) & MASK);
    const first = Number(img.readBigUInt64BE(tableOf(0)) & MASK);
    // An unallocated entry of a table that arrives after `first` now maps it too.
    let shared = false;
    for (let i = 1; i < 8 && !shared; i++) {
      const t = tableOf(i);
      if (t < first) continue;
      for (let j = 0; j < 512 && !shared; j++) {
        if (img.readBigUInt64BE(t + j * 8) !== 0n) continue;
        img.writeBigUInt64BE(0x8000000000000000n | BigInt(first), t + j * 8);
        shared = true;
      }
    }
    assert.ok(shared);
    await fsp.writeFile(file, img);
    const vdi = await createVdi(srv.url, SIZE);
    await refusedUnchanged(
      vdi.id,
      await put(vdi.id, file, 'qcow2'),
      /data cluster \d+ is used by two guest clusters/,
    );
  });

  test('a dynamic VHD without its trailing footer, whose last sector looks like one, is refused', async () => {
    const disk = Buffer.from(raw);
    seededBytes(2 * MiB, 9).copy(disk, SIZE - 2 * MiB);
    const fake = disk.subarray(SIZE - 512).fill(0);
    fake.write('conectix', 0, 'latin1');
    fake.write('win ', F.creator, 'latin1');
    fake.writeBigUInt64BE(BigInt(MiB), F.currentSize);
    fake.writeUInt32BE(2, F.diskType);
    setFooterChecksum(fake);
    const rawCopy = path.join(dir, 'fake-tail.raw');
    await fsp.writeFile(rawCopy, disk);
    const file = path.join(dir, 'fake-tail.vhd');
    await execFileP('qemu-img', ['convert', '-f', 'raw', '-O', 'vpc', rawCopy, file]);
    const img = await fsp.readFile(file);
    await fsp.writeFile(file, img.subarray(0, img.length - 512));
    const vdi = await createVdi(srv.url, SIZE);
    // Read whole, the file is a 1 MiB fixed disk; its blocks say otherwise.
    await refusedUnchanged(
      vdi.id,
      await put(vdi.id, file, 'vhd'),
      /footer at the end of the file and its copy at offset 0 disagree/,
    );
  });

  test('a fixed VHD whose first sector holds a dynamic footer copy imports as the fixed disk it is', async () => {
    const dynamic = await fsp.readFile(await qemuImage('dyn.vhd', ['-O', 'vpc']));
    const disk = Buffer.from(raw);
    dynamic.copy(disk, 0, 0, 512); // say, a guest disk holding a .vhd file at LBA 0
    const rawCopy = path.join(dir, 'vhd-at-lba0.raw');
    await fsp.writeFile(rawCopy, disk);
    const file = path.join(dir, 'vhd-at-lba0.vhd');
    await execFileP('qemu-img', [
      'convert',
      '-f',
      'raw',
      '-O',
      'vpc',
      '-o',
      'subformat=fixed',
      rawCopy,
      file,
    ]);
    const vdi = await createVdi(srv.url, 2 * SIZE);
    const { status, body } = await put(vdi.id, file, 'vhd');
    assert.equal(status, 200, JSON.stringify(body));
    assert.equal(sha256(await vdiBytes(vdi.id)), sha256(await codecDisk(file, 'vhd', 2 * SIZE)));
  });

  test('a body longer than its Content-Range streams nothing for good: the retry of those bytes wins', async (ctx) => {
    const file = await qemuImage('too-long.qcow2', ['-O', 'qcow2', '-o', 'cluster_size=4096']);
    const good = await fsp.readFile(file);
    const HALF = 2 * MiB;
    // The same image with other bytes in its data clusters below 2 MiB.
    const { bad, guest } = withBadClusters(good, 512 * 1024, HALF);
    for (let attempt = 1; ; attempt++) {
      const vdi = await createVdi(srv.url, SIZE);
      const t = await openUpload(srv.url, vdi.id, 'qcow2', good.length);
      const tooLong = new ReadableStream({
        async start(c) {
          c.enqueue(new Uint8Array(bad.subarray(0, HALF)));
          // The extra byte comes once bytes of the first 2 MiB have streamed into the disk.
          await waitFor('the chunk to stream into the disk', () => badBytesStreamed(srv.dataDir, t, guest));
          c.enqueue(new Uint8Array([1]));
          c.close();
        },
      });
      const first = await fetch(t.url, {
        method: 'PUT',
        headers: { 'content-range': `bytes 0-${HALF - 1}/${good.length}` },
        body: tooLong,
        duplex: 'half',
      } as RequestInit);
      assert.equal(first.status, 400);
      assert.equal(((await first.json()) as TaskJson).error?.code, 'CHUNK_TOO_LONG');
      if ((await bytesReceived(srv.url, vdi.id)) > 0) {
        assert.ok(attempt < RACE_ATTEMPTS, `a checkpoint came before the extra byte ${attempt} times`);
        ctx.diagnostic(`attempt ${attempt}: a checkpoint came before the extra byte; again`);
        await api(srv.url, 'DELETE', `/v1/transfers/${t.id}`);
        continue;
      }
      for (let s = 0; s < good.length; s += HALF) {
        const e = Math.min(good.length, s + HALF);
        await putRange(t.url, good, s, e);
      }
      const fin = await finalize(srv.url, t);
      assert.equal(fin.body.status, 'success', JSON.stringify(fin.body));
      assert.equal(sha256(await vdiBytes(vdi.id)), sha256(raw));
      return;
    }
  });

  test('a qcow2 of 512-byte clusters stored out of guest order streams whole and exact', async () => {
    // Hand-made: v2, one L2 table per 64 guest clusters, even guest clusters stored first.
    const n = 8192;
    const C = 512;
    const tables = n / 64;
    const l1At = 1;
    const l2At = l1At + Math.ceil((tables * 8) / C) + 1;
    const dataAt = l2At + tables;
    const img = Buffer.alloc((dataAt + n) * C);
    img.write('QFI\xfb', 0, 'latin1');
    img.writeUInt32BE(2, 4);
    img.writeUInt32BE(9, 20);
    img.writeBigUInt64BE(BigInt(n * C), 24);
    img.writeUInt32BE(tables, 36);
    img.writeBigUInt64BE(BigInt(l1At * C), 40);
    img.writeBigUInt64BE(BigInt((l2At - 1) * C), 48);
    img.writeUInt32BE(1, 56);
    for (let t = 0; t < tables; t++)
      img.writeBigUInt64BE((1n << 63n) | BigInt((l2At + t) * C), l1At * C + t * 8);
    const expected = Buffer.alloc(n * C);
    for (let g = 0; g < n; g++) {
      const slot = g % 2 === 0 ? g / 2 : n / 2 + (g - 1) / 2;
      img.writeBigUInt64BE((1n << 63n) | BigInt((dataAt + slot) * C), l2At * C + g * 8);
      seededBytes(C, g).copy(img, (dataAt + slot) * C);
      seededBytes(C, g).copy(expected, g * C);
    }
    const file = path.join(dir, 'interleaved.qcow2');
    await fsp.writeFile(file, img);
    assert.ok((await codecDisk(file, 'qcow2', n * C)).equals(expected), 'the codec reads what was written');
    const vdi = await createVdi(srv.url, n * C);
    const { status, body } = await put(vdi.id, file, 'qcow2');
    assert.equal(status, 200, JSON.stringify(body));
    assert.equal(body.result.bytes_streamed, n * C);
    assert.equal(sha256(await vdiBytes(vdi.id)), sha256(expected));
  });

  test('a kill -9 between the last chunk and finalize still catches footers that disagree', async () => {
    const file = await qemuImage('disagree-restart.vhd', ['-O', 'vpc']);
    const img = await fsp.readFile(file);
    const tail = img.subarray(img.length - 512);
    tail.writeUInt32BE(2, F.diskType); // the trailing footer says fixed; the copy at 0 says dynamic
    setFooterChecksum(tail);
    const dataDir = await tempDir();
    let server = await spawnServer(dataDir);
    try {
      const vdi = await createVdi(server.url, 2 * SIZE);
      const t = await openUpload(server.url, vdi.id, 'vhd', img.length);
      const res = await fetch(at(t.url, server.url), {
        method: 'PUT',
        headers: { 'content-range': `bytes 0-${img.length - 1}/${img.length}` },
        body: new Uint8Array(img),
      });
      assert.equal(res.status, 200);
      await server.stop('SIGKILL');
      server = await spawnServer(dataDir);
      const fin = await finalize(server.url, t);
      assert.equal(fin.body.status, 'failure', JSON.stringify(fin.body));
      assert.match(
        fin.body.error?.message ?? '',
        /footer at the end of the file and its copy at offset 0 disagree/,
      );
      const rec = (await api<{ generation: number }>(server.url, 'GET', `/v1/vdis/${vdi.id}`)).body;
      assert.equal(rec.generation, 0);
    } finally {
      await server.stop();
      await fsp.rm(dataDir, { recursive: true, force: true });
    }
  });

  test('a kill -9 after bytes streamed but before they counted: the other bytes sent after it win', async (ctx) => {
    const file = await qemuImage('unrecorded.qcow2', ['-O', 'qcow2', '-o', 'cluster_size=4096']);
    const good = await fsp.readFile(file);
    // The first attempt carries other bytes in the data clusters of the second MiB.
    const { bad, guest } = withBadClusters(good, MiB, 2 * MiB);
    const dataDir = await tempDir();
    let server = await spawnServer(dataDir);
    try {
      for (let attempt = 1; ; attempt++) {
        const vdi = await createVdi(server.url, SIZE);
        const t = await openUpload(server.url, vdi.id, 'qcow2', good.length);
        // 2 MiB of a 4 MiB chunk, then silence (and no timer that would hold the test process).
        const stalled = new ReadableStream({
          start(c) {
            c.enqueue(new Uint8Array(bad.subarray(0, 2 * MiB)));
          },
        });
        const first = fetch(t.url, {
          method: 'PUT',
          headers: { 'content-range': `bytes 0-${4 * MiB - 1}/${good.length}` },
          body: stalled,
          duplex: 'half',
        } as RequestInit).catch((err) => err);
        await waitFor('the chunk to stream into the disk', () => badBytesStreamed(dataDir, t, guest));
        await server.stop('SIGKILL');
        await first;
        server = await spawnServer(dataDir);
        if ((await bytesReceived(server.url, vdi.id)) > 0) {
          assert.ok(attempt < RACE_ATTEMPTS, `a checkpoint came before the kill ${attempt} times`);
          ctx.diagnostic(`attempt ${attempt}: a checkpoint came before the kill; again`);
          await api(server.url, 'DELETE', `/v1/transfers/${t.id}`);
          continue;
        }
        // The second MiB first, so it is staged rather than streamed again.
        for (const [s, e] of [
          [MiB, 2 * MiB],
          [0, MiB],
          [2 * MiB, good.length],
        ]) {
          await putRange(at(t.url, server.url), good, s, e);
        }
        const fin = await finalize(server.url, t);
        assert.equal(fin.body.status, 'success', JSON.stringify(fin.body));
        assert.equal(sha256(await curl([`${server.url}/v1/vdis/${vdi.id}/contents`])), sha256(raw));
        return;
      }
    } finally {
      await server.stop();
      await fsp.rm(dataDir, { recursive: true, force: true });
    }
  });

  test('a disk write failing while data streams (ENOSPC): no lost byte counts as received; the resent rest makes the disk exact', async () => {
    const img = await fsp.readFile(await qemuImage('enospc.vhd', ['-O', 'vpc']));
    const vdi = await createVdi(srv.url, SIZE);
    const t = await openUpload(srv.url, vdi.id, 'vhd', img.length);
    // The second gathered write fails as a full disk fails it.
    const fault = failNthDirectWrite(2);
    try {
      const res = await fetch(t.url, {
        method: 'PUT',
        headers: { 'content-range': `bytes 0-${img.length - 1}/${img.length}` },
        body: new Uint8Array(img),
      });
      assert.equal(res.status, 507, 'the client hears that the disk is full');
      assert.equal(((await res.json()) as { error: { code: string } }).error.code, 'INSUFFICIENT_SPACE');
    } finally {
      fault.restore();
    }
    assert.ok(fault.writes >= 2, 'the failing write was reached');
    const offset = Number((await fetch(t.url, { method: 'HEAD' })).headers.get('upload-offset'));
    assert.ok(offset < img.length, `only what is on disk counts as received (offset ${offset})`);
    await putRange(t.url, img, offset, img.length);
    const fin = await finalize(srv.url, t);
    assert.equal(fin.body.status, 'success', JSON.stringify(fin.body));
    assert.equal(sha256(await vdiBytes(vdi.id)), sha256(raw), 'the disk is the image, byte for byte');
  });

  test("the digests of streamed blocks are the disk's: changed blocks after vhd and qcow2 imports equal a brute-force comparison", async () => {
    const BLOCK = 64 * 1024;
    const vdi = await createVdi(srv.url, SIZE);
    let disk = Buffer.from(raw);
    const res = await fetch(`${srv.url}/v1/vdis/${vdi.id}/contents?format=raw`, {
      method: 'PUT',
      body: new Uint8Array(disk),
    });
    assert.equal(res.status, 200, await res.text());
    const snap = await api<{ id: string }>(srv.url, 'POST', `/v1/vdis/${vdi.id}/snapshots`, {});
    assert.equal(snap.status, 201, JSON.stringify(snap.body));
    const rnd = prng(4242);
    const imports: [string, string[]][] = [
      ['qcow2', ['-O', 'qcow2', '-o', 'cluster_size=65536']],
      ['vhd', ['-O', 'vpc']],
      ['qcow2', ['-O', 'qcow2', '-o', 'cluster_size=512']],
      ['qcow2', ['-O', 'qcow2', '-o', 'cluster_size=2097152']],
    ];
    for (const [step, [format, args]] of imports.entries()) {
      // Writes at odd offsets and of odd lengths: new bytes, zeros, the same bytes again.
      const next = Buffer.from(disk);
      for (let w = 0; w < 12; w++) {
        const at = Math.floor(rnd() * SIZE) & ~511;
        const len = Math.min(SIZE - at, 512 * (1 + Math.floor(rnd() * 400)));
        const kind = rnd();
        if (kind < 0.25) next.fill(0, at, at + len);
        else if (kind < 0.4) disk.copy(next, at, at, at + len);
        else seededBytes(len, 900 + step * 20 + w).copy(next, at);
      }
      const nextFile = path.join(dir, `digests-${step}.raw`);
      await fsp.writeFile(nextFile, next);
      const file = path.join(dir, `digests-${step}.${format}`);
      await execFileP('qemu-img', ['convert', '-f', 'raw', ...args, nextFile, file]);
      const { status, body } = await put(vdi.id, file, format);
      assert.equal(status, 200, JSON.stringify(body));
      assert.ok((body.result.bytes_streamed ?? 0) > 0, `the ${format} streamed`);
      assert.equal(sha256(await vdiBytes(vdi.id)), sha256(next));
      const bits = await api<{ bitmap: string }>(
        srv.url,
        'GET',
        `/v1/vdis/${vdi.id}/changed-blocks?base=${snap.body.id}`,
      );
      assert.equal(bits.status, 200, JSON.stringify(bits.body));
      const bytes = Buffer.from(bits.body.bitmap, 'base64');
      const got = Array.from({ length: SIZE / BLOCK }, (_, i) => (bytes[i >> 3] & (0x80 >> (i & 7))) !== 0);
      const want = Array.from(
        { length: SIZE / BLOCK },
        (_, i) => !raw.subarray(i * BLOCK, (i + 1) * BLOCK).equals(next.subarray(i * BLOCK, (i + 1) * BLOCK)),
      );
      assert.deepEqual(got, want, `import ${step} (${format}): changed blocks against the snapshot`);
      disk = next;
    }
  });

  test('a chunked VHD upload (no length up front) is staged whole, since its last sector decides', async () => {
    const file = await qemuImage('chunked.vhd', ['-O', 'vpc']);
    const img = await fsp.readFile(file);
    const vdi = await createVdi(srv.url, 2 * SIZE);
    const body = new ReadableStream({
      start(c) {
        for (let s = 0; s < img.length; s += MiB) c.enqueue(new Uint8Array(img.subarray(s, s + MiB)));
        c.close();
      },
    });
    const res = await fetch(`${srv.url}/v1/vdis/${vdi.id}/contents?format=vhd`, {
      method: 'PUT',
      body,
      duplex: 'half',
    } as RequestInit);
    const task = (await res.json()) as TaskJson;
    assert.equal(res.status, 200, JSON.stringify(task));
    assert.equal(task.result.bytes_streamed, 0);
    assert.equal(sha256((await vdiBytes(vdi.id)).subarray(0, SIZE)), sha256(raw));
  });
});
