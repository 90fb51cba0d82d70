import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { api, createVdi, curl } from './helpers/api.js';
import { seededBytes, startServer, type TestServer, tempDir } from './helpers/server.js';

const MiB = 1024 * 1024;
const TiB = 1024 * 1024 * MiB;

interface Extent {
  start: number;
  length: number;
  zero: boolean;
}

function assertCovers(extents: Extent[], size: number): void {
  let pos = 0;
  for (const [i, e] of extents.entries()) {
    assert.equal(e.start, pos, `extent ${i} starts where the previous one ended`);
    assert.ok(e.length > 0, `extent ${i} is not empty`);
    if (i > 0) assert.notEqual(e.zero, extents[i - 1].zero, `extents ${i - 1} and ${i} are merged`);
    pos += e.length;
  }
  assert.equal(pos, size, 'the extents cover the whole disk exactly once');
}

describe('GET /v1/vdis/{vdi}/extents', () => {
  let srv: TestServer;
  let dir: string;
  before(async () => {
    srv = await startServer();
    dir = await tempDir();
  });
  after(async () => {
    await srv.close();
    await fsp.rm(dir, { recursive: true, force: true });
  });

  test('a new VDI is one zero extent', async () => {
    const vdi = await createVdi(srv.url, 64 * MiB);
    const res = await api<Extent[]>(srv.url, 'GET', `/v1/vdis/${vdi.id}/extents`);
    assert.equal(res.status, 200);
    assert.deepEqual(res.body, [{ start: 0, length: 64 * MiB, zero: true }]);
  });

  test('a 2 TiB VDI with three data regions answers with a handful of merged extents, fast', async () => {
    // A small raw image with data at 0, 3 MiB and 7 MiB (64 KiB each), holes between.
    const file = path.join(dir, 'three-regions.img');
    const h = await fsp.open(file, 'w');
    const regions = [0, 3 * MiB, 7 * MiB];
    for (const [i, at] of regions.entries()) await h.write(seededBytes(64 * 1024, i + 1), 0, 64 * 1024, at);
    await h.truncate(8 * MiB);
    await h.close();

    const vdi = await createVdi(srv.url, 2 * TiB);
    const task = JSON.parse(
      (await curl(['-T', file, `${srv.url}/v1/vdis/${vdi.id}/contents?format=raw`])).toString(),
    );
    assert.equal(task.status, 'success');

    const started = performance.now();
    const res = await api<Extent[]>(srv.url, 'GET', `/v1/vdis/${vdi.id}/extents`);
    const elapsedMs = performance.now() - started;
    assert.equal(res.status, 200);
    assertCovers(res.body, 2 * TiB);
    assert.deepEqual(
      res.body.filter((e) => !e.zero).map((e) => [e.start, e.length]),
      regions.map((at) => [at, 64 * 1024]),
    );
    assert.equal(res.body.length, 6, JSON.stringify(res.body));
    assert.ok(elapsedMs < 1000, `listing the extents of 2 TiB took ${elapsedMs.toFixed(0)} ms`);

    const withContext = await api<Extent[]>(srv.url, 'GET', `/v1/vdis/${vdi.id}/extents?context=zero`);
    assert.deepEqual(withContext.body, res.body, 'context=zero (ovirt-imageio) gives the same map');
  });

  test('an unknown context is refused with 400; an unknown VDI with 404', async () => {
    const vdi = await createVdi(srv.url, MiB);
    const dirty = await api<{ error: { code: string; message: string } }>(
      srv.url,
      'GET',
      `/v1/vdis/${vdi.id}/extents?context=bitmap`,
    );
    assert.equal(dirty.status, 400);
    assert.match(dirty.body.error.message, /zero, dirty/);
    const missing = await api<{ error: { code: string } }>(srv.url, 'GET', '/v1/vdis/nope/extents');
    assert.equal(missing.status, 404);
    assert.equal(missing.body.error.code, 'VDI_NOT_FOUND');
  });

  test('with a token, extents need it like every /v1 call', async () => {
    const secured = await startServer({ token: 's3cret' });
    try {
      const res = await api(secured.url, 'GET', '/v1/vdis/any/extents');
      assert.equal(res.status, 401);
      const wrong = await api(secured.url, 'GET', '/v1/vdis/any/extents', undefined, {
        authorization: 'Bearer nope',
      });
      assert.equal(wrong.status, 403);
    } finally {
      await secured.close();
    }
  });
});
