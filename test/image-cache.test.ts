/**
 * Reads share the opened image of a generation (VdiStore.images): the next
 * request after a commit or a delete must see it, and a generation nobody
 * reads any more must not stay open (its file's space is held until then).
 */
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import { after, before, describe, test } from 'node:test';
import { createVdi } from './helpers/api.js';
import { seededBytes, startServer, type TestServer } from './helpers/server.js';

const MiB = 1024 * 1024;

/** Paths of the files this process holds open under `dir`. */
async function openFilesUnder(dir: string): Promise<string[]> {
  const fds = await fsp.readdir('/proc/self/fd');
  const targets = await Promise.all(fds.map((fd) => fsp.readlink(`/proc/self/fd/${fd}`).catch(() => '')));
  return targets.filter((t) => t.startsWith(dir));
}

async function range(base: string, vdi: string, format: string, start: number, end: number) {
  const res = await fetch(`${base}/v1/vdis/${vdi}/contents?format=${format}`, {
    headers: { range: `bytes=${start}-${end}` },
  });
  return { status: res.status, etag: res.headers.get('etag'), body: Buffer.from(await res.arrayBuffer()) };
}

describe('shared images of a generation', () => {
  let srv: TestServer;
  before(async () => {
    srv = await startServer();
  });
  after(() => srv.close());

  test('a ranged read after a commit reads the new content, and the old generation is closed', async () => {
    const vdi = (await createVdi(srv.url, 4 * MiB)).id;
    const first = seededBytes(4 * MiB, 1);
    const second = seededBytes(4 * MiB, 2);
    const put = (body: Buffer) =>
      fetch(`${srv.url}/v1/vdis/${vdi}/contents`, { method: 'PUT', body: new Uint8Array(body) });
    assert.equal((await put(first)).status, 200);
    const a = await range(srv.url, vdi, 'raw', MiB, MiB + 65535);
    assert.ok(a.body.equals(first.subarray(MiB, MiB + 65536)));
    // Layouts of the same generation in other formats are shared too.
    for (const format of ['vhd', 'qcow2'])
      assert.equal((await range(srv.url, vdi, format, 0, 511)).status, 206);
    const held = await openFilesUnder(srv.dataDir);
    assert.equal(held.filter((f) => f.includes(`${vdi}.g1.`)).length, 1, 'one open file for generation 1');

    assert.equal((await put(second)).status, 200);
    const b = await range(srv.url, vdi, 'raw', MiB, MiB + 65535);
    assert.ok(b.body.equals(second.subarray(MiB, MiB + 65536)), 'the new generation is read');
    assert.notEqual(a.etag, b.etag);
    const now = await openFilesUnder(srv.dataDir);
    assert.deepEqual(
      now.filter((f) => f.includes(`${vdi}.g1.`)),
      [],
      'generation 1 is closed once nobody reads it',
    );
  });

  test('a deleted VDI is gone for the next read, and its file is closed', async () => {
    const vdi = (await createVdi(srv.url, MiB)).id;
    await fetch(`${srv.url}/v1/vdis/${vdi}/contents`, { method: 'PUT', body: Buffer.alloc(MiB, 3) });
    assert.equal((await range(srv.url, vdi, 'raw', 0, 9)).status, 206);
    assert.equal((await fetch(`${srv.url}/v1/vdis/${vdi}`, { method: 'DELETE' })).status, 204);
    assert.equal((await range(srv.url, vdi, 'raw', 0, 9)).status, 404);
    assert.deepEqual(
      (await openFilesUnder(srv.dataDir)).filter((f) => f.includes(vdi)),
      [],
    );
  });

  test('an export still running keeps its generation while a commit lands', async () => {
    const vdi = (await createVdi(srv.url, 8 * MiB)).id;
    const first = seededBytes(8 * MiB, 4);
    await fetch(`${srv.url}/v1/vdis/${vdi}/contents`, { method: 'PUT', body: new Uint8Array(first) });
    const res = await fetch(`${srv.url}/v1/vdis/${vdi}/contents`);
    const reader = (res.body as ReadableStream<Uint8Array>).getReader();
    const chunks: Buffer[] = [Buffer.from((await reader.read()).value!)];
    // A new generation commits while the first export is mid-way.
    await fetch(`${srv.url}/v1/vdis/${vdi}/contents`, { method: 'PUT', body: Buffer.alloc(8 * MiB, 5) });
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      chunks.push(Buffer.from(value));
    }
    assert.ok(Buffer.concat(chunks).equals(first), 'the running export read its own generation to the end');
  });
});
