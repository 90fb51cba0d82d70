/**
 * Exports in every wire format are range-addressable: any slice of the
 * stream can be fetched on its own, and a cut download resumes exactly.
 */
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { createVdi, curl, execFileP } from './helpers/api.js';
import { prng, seededBytes, startServer, type TestServer, tempDir } from './helpers/server.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

describe('ranged exports in raw, vhd and qcow2', () => {
  let srv: TestServer;
  let dir: string;
  let vdiId: string;
  before(async () => {
    srv = await startServer();
    dir = await tempDir();
    const size = 24 * MiB;
    vdiId = (await createVdi(srv.url, size)).id;
    const image = Buffer.alloc(size);
    for (let i = 0; i < 6; i++) seededBytes(700 * 1024, 40 + i).copy(image, i * 4 * MiB + i * 12345 * 512);
    const put = await fetch(`${srv.url}/v1/vdis/${vdiId}/contents`, {
      method: 'PUT',
      body: new Uint8Array(image),
    });
    assert.equal(put.status, 200);
  });
  after(async () => {
    await srv.close();
    await fsp.rm(dir, { recursive: true, force: true });
  });

  for (const format of ['raw', 'vhd', 'qcow2'] as const) {
    test(`${format}: 200 seeded random ranges equal the same slices of the whole export`, async () => {
      const url = `${srv.url}/v1/vdis/${vdiId}/contents?format=${format}`;
      const whole = Buffer.from(await (await fetch(url)).arrayBuffer());
      const again = await fetch(url, { method: 'HEAD' });
      assert.equal(Number(again.headers.get('content-length')), whole.length);
      const rnd = prng(format.length * 7919);
      for (let i = 0; i < 200; i++) {
        const start = Math.floor(rnd() * whole.length);
        const end = Math.min(whole.length - 1, start + Math.floor(rnd() * (i % 10 === 0 ? 3 * MiB : 70000)));
        const res = await fetch(url, { headers: { range: `bytes=${start}-${end}` } });
        assert.equal(res.status, 206);
        const got = Buffer.from(await res.arrayBuffer());
        assert.ok(got.equals(whole.subarray(start, end + 1)), `${format} bytes ${start}-${end}`);
      }
    });

    test(`${format}: a download cut at a random point resumes with Range + If-Range to identical bytes`, async () => {
      const url = `${srv.url}/v1/vdis/${vdiId}/contents?format=${format}`;
      const whole = Buffer.from(await (await fetch(url)).arrayBuffer());
      const cutAt = 1 + Math.floor(prng(format.length)() * (whole.length - 2));
      const first = await fetch(url);
      const etag = first.headers.get('etag')!;
      const reader = (first.body as ReadableStream<Uint8Array>).getReader();
      const got: Buffer[] = [];
      let n = 0;
      while (n < cutAt) {
        const { value, done } = await reader.read();
        if (done) break;
        got.push(Buffer.from(value));
        n += value.length;
      }
      await reader.cancel();
      const head = Buffer.concat(got).subarray(0, cutAt);
      const rest = await fetch(url, { headers: { range: `bytes=${cutAt}-`, 'if-range': etag } });
      assert.equal(rest.status, 206);
      assert.ok(Buffer.concat([head, Buffer.from(await rest.arrayBuffer())]).equals(whole));
    });
  }

  test('two exports of the same content are byte-identical and share an ETag', async () => {
    for (const format of ['vhd', 'qcow2']) {
      const url = `${srv.url}/v1/vdis/${vdiId}/contents?format=${format}`;
      const a = await fetch(url);
      const b = await fetch(url);
      assert.equal(a.headers.get('etag'), b.headers.get('etag'));
      assert.ok(Buffer.from(await a.arrayBuffer()).equals(Buffer.from(await b.arrayBuffer())));
    }
  });

  test('a 2 TiB disk with a few MiB of data imports and exports in time proportional to the data', async () => {
    const size = 2048 * GiB;
    const raw = path.join(dir, 'big.raw');
    const h = await fsp.open(raw, 'w');
    await h.truncate(size);
    const pieces: [number, Buffer][] = [
      [0, seededBytes(MiB, 1)],
      [1000 * GiB, seededBytes(2 * MiB, 2)],
      [size - MiB, seededBytes(MiB, 3)],
    ];
    for (const [at, data] of pieces) await h.write(data, 0, data.length, at);
    await h.close();
    const qcow2 = path.join(dir, 'big.qcow2');
    await execFileP('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2]);
    const vdi = await createVdi(srv.url, size);
    const started = Date.now();
    const task = JSON.parse(
      (await curl(['-T', qcow2, `${srv.url}/v1/vdis/${vdi.id}/contents?format=qcow2`])).toString(),
    );
    assert.equal(task.status, 'success');
    const out = path.join(dir, 'big-export.qcow2');
    await curl(['-o', out, `${srv.url}/v1/vdis/${vdi.id}/contents?format=qcow2`]);
    const elapsed = Date.now() - started;
    assert.ok((await fsp.stat(out)).size < 8 * MiB, 'only allocated clusters are emitted');
    await execFileP('qemu-img', ['check', out]);
    await execFileP('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', raw, out]);
    const vhd = await fetch(`${srv.url}/v1/vdis/${vdi.id}/contents?format=vhd`, { method: 'HEAD' });
    assert.equal(vhd.status, 422, 'a VHD cannot describe more than 2040 GiB');
    const rawSlice = await fetch(`${srv.url}/v1/vdis/${vdi.id}/contents`, {
      headers: { range: `bytes=${1000 * GiB}-${1000 * GiB + 2 * MiB - 1}` },
    });
    assert.ok(Buffer.from(await rawSlice.arrayBuffer()).equals(pieces[1][1]));
    assert.ok(elapsed < 30000, `2 TiB sparse round trip took ${elapsed} ms`);
  });
});
