/** A tus upload survives a kill -9 of the server: HEAD gives the durable offset and the upload finishes. */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { Readable } from 'node:stream';
import { after, describe, test } from 'node:test';
import { createVdi, sha256Url } from './helpers/api.js';
import { seededBytes, spawnServer, startServer, tempDir } from './helpers/server.js';

const MiB = 1024 * 1024;
const TUS = { 'tus-resumable': '1.0.0' };
const b64 = (s: string) => Buffer.from(s).toString('base64');

describe('tus: complete means committed', () => {
  test('a HEAD on an upload whose bytes all arrived but whose commit never ran commits it before answering', async () => {
    const srv = await startServer();
    try {
      const data = seededBytes(2 * MiB, 78);
      const vdi = await createVdi(srv.url, 2 * MiB);
      const created = await fetch(`${srv.url}/v1/tus/`, {
        method: 'POST',
        headers: {
          ...TUS,
          'upload-length': String(data.length),
          'upload-metadata': `vdi ${b64(vdi.id)},format ${b64('raw')}`,
        },
      });
      const location = new URL(created.headers.get('location')!, srv.url).pathname;
      const id = location.split('/').pop()!;
      // Every byte lands, as if the server died right after the last PATCH recorded it.
      await srv.services.transfers.write(id, Readable.from([data]), {
        range: { start: 0, end: data.length - 1, total: data.length },
      });
      const head = await fetch(`${srv.url}${location}`, { method: 'HEAD', headers: TUS });
      assert.equal(head.headers.get('upload-offset'), String(data.length));
      assert.equal(
        await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`),
        createHash('sha256').update(data).digest('hex'),
        'offset == length was only said once the VDI held the bytes',
      );
    } finally {
      await srv.close();
    }
  });
});

describe('tus across a crash', () => {
  const dirs: string[] = [];
  after(async () => {
    for (const d of dirs) await fsp.rm(d, { recursive: true, force: true });
  });

  test('kill -9 after part of an upload: the restarted server resumes it at its offset, byte-exact', async () => {
    const dataDir = await tempDir();
    dirs.push(dataDir);
    const data = seededBytes(8 * MiB, 77);
    let server = await spawnServer(dataDir);
    const vdi = await createVdi(server.url, 8 * MiB);
    const created = await fetch(`${server.url}/v1/tus/`, {
      method: 'POST',
      headers: {
        ...TUS,
        'upload-length': String(data.length),
        'upload-metadata': `vdi ${b64(vdi.id)},format ${b64('raw')}`,
      },
    });
    assert.equal(created.status, 201);
    const location = new URL(created.headers.get('location')!, server.url).pathname;
    const patch = (base: string, offset: number, body: Buffer) =>
      fetch(`${base}${location}`, {
        method: 'PATCH',
        headers: {
          ...TUS,
          'upload-offset': String(offset),
          'content-type': 'application/offset+octet-stream',
        },
        body: new Uint8Array(body),
      });
    assert.equal((await patch(server.url, 0, data.subarray(0, 3 * MiB))).status, 204);

    await server.stop('SIGKILL');
    server = await spawnServer(dataDir);
    try {
      const head = await fetch(`${server.url}${location}`, { method: 'HEAD', headers: TUS });
      assert.equal(head.status, 200);
      const offset = Number(head.headers.get('upload-offset'));
      assert.equal(offset, 3 * MiB, 'every byte acknowledged before the crash is still there');
      const last = await patch(server.url, offset, data.subarray(offset));
      assert.equal(last.status, 204, await last.text());
      assert.equal(
        await sha256Url(`${server.url}/v1/vdis/${vdi.id}/contents`),
        createHash('sha256').update(data).digest('hex'),
      );
    } finally {
      await server.stop();
    }
    assert.deepEqual(await fsp.readdir(path.join(dataDir, 'srs', 'local', '.staging')), []);
  });
});
