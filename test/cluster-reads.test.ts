/**
 * Several nodes over one PostgreSQL database and one data directory answer
 * reads alike: three processes started together on a new database (they
 * migrate it once between them), a disk written through one and read
 * through the others before and after the write, in every format.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { after, describe, test } from 'node:test';
import { api, createVdi } from './helpers/api.js';
import { TEST_DATABASE_URL } from './helpers/pg.js';
import { type ServerProcess, seededBytes, spawnServer, tempDir } from './helpers/server.js';

const MiB = 1024 * 1024;
const skip = TEST_DATABASE_URL
  ? false
  : 'several nodes share PostgreSQL, not SQLite: run by npm run test:postgres';

const sha256 = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

async function read(url: string, vdi: string, format: string, range?: string): Promise<Buffer> {
  const res = await fetch(`${url}/v1/vdis/${vdi}/contents?format=${format}`, {
    headers: range ? { range } : {},
  });
  assert.equal(res.status, range ? 206 : 200, `${url} ${format} ${range ?? ''}`);
  return Buffer.from(await res.arrayBuffer());
}

async function put(url: string, vdi: string, bytes: Buffer): Promise<void> {
  const res = await fetch(`${url}/v1/vdis/${vdi}/contents?format=raw`, {
    method: 'PUT',
    body: new Uint8Array(bytes),
  });
  assert.equal(res.status, 200, await res.text());
}

describe('several nodes over one database', { skip }, () => {
  const nodes: ServerProcess[] = [];
  after(async () => {
    await Promise.all(nodes.map((n) => n.stop()));
  });

  test('nodes started together migrate the database once, and a write through one is what the others read', async () => {
    const dataDir = await tempDir();
    nodes.push(...(await Promise.all([0, 1, 2].map(() => spawnServer(dataDir)))));
    const [a, b, c] = nodes;
    const vdi = await createVdi(a.url, 8 * MiB);
    const first = seededBytes(8 * MiB, 1);
    const second = seededBytes(8 * MiB, 2);

    await put(a.url, vdi.id, first);
    // every node reads it, and keeps what it read (image, layout) for the next request
    for (const n of nodes) {
      assert.equal(sha256(await read(n.url, vdi.id, 'raw')), sha256(first));
      for (const format of ['raw', 'vhd', 'qcow2']) await read(n.url, vdi.id, format, 'bytes=0-65535');
    }
    const exportsBefore = await Promise.all(
      ['vhd', 'qcow2'].map(async (f) => sha256(await read(a.url, vdi.id, f))),
    );

    // written through another node: none may answer with the first bytes
    await put(b.url, vdi.id, second);
    for (const n of [a, b, c]) {
      assert.deepEqual(
        await read(n.url, vdi.id, 'raw', 'bytes=1048576-1114111'),
        second.subarray(MiB, MiB + 65536),
        `${n.url}: a small ranged read after the write`,
      );
      assert.equal(sha256(await read(n.url, vdi.id, 'raw')), sha256(second), `${n.url}: the whole disk`);
      const row = (await api<{ generation: number }>(n.url, 'GET', `/v1/vdis/${vdi.id}`)).body;
      assert.equal(
        row.generation,
        (await api<{ generation: number }>(b.url, 'GET', `/v1/vdis/${vdi.id}`)).body.generation,
      );
    }
    const exportsAfter = await Promise.all(
      ['vhd', 'qcow2'].map(async (f) => [
        sha256(await read(a.url, vdi.id, f)),
        sha256(await read(c.url, vdi.id, f)),
      ]),
    );
    for (const [i, [fromA, fromC]] of exportsAfter.entries()) {
      assert.equal(fromA, fromC, 'two nodes export the same image');
      assert.notEqual(fromA, exportsBefore[i], 'the export is of the new bytes');
    }
  });
});
