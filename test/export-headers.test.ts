import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import request from 'supertest';
import { createVdi } from './helpers/api.js';
import { sample, scrape } from './helpers/metrics.js';
import { prng, seededBytes, startServer, type TestServer } from './helpers/server.js';

const SIZE = 4 * 1024 * 1024;

describe('export validators, conditionals and ranges (RFC 9110)', () => {
  let srv: TestServer;
  let url: string;
  let data: Buffer;
  before(async () => {
    srv = await startServer();
    const vdi = await createVdi(srv.url, SIZE, { name_label: 'db data/1' });
    data = seededBytes(SIZE, 7);
    const put = await fetch(`${srv.url}/v1/vdis/${vdi.id}/contents?format=raw`, {
      method: 'PUT',
      body: new Uint8Array(data),
    });
    assert.equal(put.status, 200);
    url = `/v1/vdis/${vdi.id}/contents`;
  });
  after(() => srv.close());

  test('HEAD gives size, validators, ranges support and a filename, without a body', async () => {
    const res = await request(srv.url).head(url).expect(200);
    assert.equal(res.headers['content-length'], String(SIZE));
    assert.equal(res.headers['accept-ranges'], 'bytes');
    assert.match(res.headers.etag, /^"[^"]+"$/, 'a strong ETag');
    assert.ok(!Number.isNaN(Date.parse(res.headers['last-modified'])));
    assert.equal(res.headers['content-disposition'], 'attachment; filename="db_data_1.img"');
  });

  test('the ETag is stable for the same content and changes when the content changes', async () => {
    const a = (await request(srv.url).head(url)).headers.etag;
    const b = (await request(srv.url).head(url)).headers.etag;
    assert.equal(a, b);
    const vdi = await createVdi(srv.url, 1024 * 1024);
    const before = (await request(srv.url).head(`/v1/vdis/${vdi.id}/contents`)).headers.etag;
    await fetch(`${srv.url}/v1/vdis/${vdi.id}/contents`, { method: 'PUT', body: Buffer.alloc(4096, 1) });
    const after = (await request(srv.url).head(`/v1/vdis/${vdi.id}/contents`)).headers.etag;
    assert.notEqual(before, after);
  });

  test('If-None-Match with the current ETag gives 304', async () => {
    const etag = (await request(srv.url).head(url)).headers.etag;
    await request(srv.url).get(url).set('If-None-Match', etag).expect(304);
    await request(srv.url).get(url).set('If-None-Match', '"something-else"').expect(200);
  });

  test('If-Range with the current ETag honours Range; a stale one sends the whole image', async () => {
    const etag = (await request(srv.url).head(url)).headers.etag;
    const hit = await request(srv.url)
      .get(url)
      .set('Range', 'bytes=10-19')
      .set('If-Range', etag)
      .buffer(true)
      .expect(206);
    assert.equal(hit.headers['content-range'], `bytes 10-19/${SIZE}`);
    const stale = await request(srv.url)
      .head(url)
      .set('Range', 'bytes=10-19')
      .set('If-Range', '"old"')
      .expect(200);
    assert.equal(stale.headers['content-length'], String(SIZE));
    const weak = await request(srv.url)
      .head(url)
      .set('Range', 'bytes=10-19')
      .set('If-Range', `W/${etag}`)
      .expect(200);
    assert.equal(weak.headers['content-length'], String(SIZE), 'If-Range needs a strong match');
  });

  test('unsatisfiable ranges get 416 with Content-Range: bytes */N and a JSON error', async () => {
    // an inverted range is invalid; RFC 9110 lets us reject it as nginx does
    for (const range of [`bytes=${SIZE}-`, `bytes=${SIZE + 10}-${SIZE + 20}`, 'bytes=5-1']) {
      const res = await request(srv.url).get(url).set('Range', range).expect(416);
      assert.equal(res.headers['content-range'], `bytes */${SIZE}`);
      assert.equal(res.body.error.code, 'RANGE_NOT_SATISFIABLE');
    }
  });

  test('a suffix longer than the image asks for all of it: 206 with every byte (RFC 9110 §14.1.3)', async () => {
    // curl -r -1048576 on a smaller disk: its last MiB is all of it.
    for (const range of [`bytes=-${SIZE + 1}`, `bytes=-${SIZE * 4}`]) {
      const res = await fetch(srv.url + url, { headers: { range } });
      assert.equal(res.status, 206, range);
      assert.equal(res.headers.get('content-range'), `bytes 0-${SIZE - 1}/${SIZE}`);
      assert.ok(Buffer.from(await res.arrayBuffer()).equals(data), range);
    }
  });

  test('a malformed Range header or unknown unit is ignored: the whole image is sent', async () => {
    for (const range of ['bytes=abc', 'items=0-5', 'bytes=1-2-3']) {
      const res = await request(srv.url).head(url).set('Range', range);
      assert.equal(res.status, 200, range);
      assert.equal(res.headers['content-length'], String(SIZE));
    }
  });

  test('overlapping ranges are coalesced; 100 random single ranges equal the same slice', async () => {
    const res = await request(srv.url).get(url).set('Range', 'bytes=0-99,50-149').buffer(true).expect(206);
    assert.equal(res.headers['content-range'], `bytes 0-149/${SIZE}`);
    const rnd = prng(3);
    for (let i = 0; i < 100; i++) {
      const start = Math.floor(rnd() * SIZE);
      const end = Math.min(SIZE - 1, start + Math.floor(rnd() * 300000));
      const r = await fetch(srv.url + url, { headers: { range: `bytes=${start}-${end}` } });
      assert.equal(r.status, 206);
      assert.ok(
        Buffer.from(await r.arrayBuffer()).equals(data.subarray(start, end + 1)),
        `range ${start}-${end}`,
      );
    }
  });

  test('an unknown export format is refused with the formats to use', async () => {
    const res = await request(srv.url).get(`${url}?format=vmdk`).expect(400);
    assert.equal(res.body.error.code, 'FORMAT_NOT_SUPPORTED');
    assert.match(res.body.error.message, /raw/);
  });

  test('a GET of the whole image is an export task with its bytes counted', async () => {
    const res = await request(srv.url).get(url).buffer(true).expect(200);
    const taskId = res.headers['x-task-id'];
    assert.ok(taskId, 'a whole-image export names its task');
    const task = await request(srv.url).get(`/v1/tasks/${taskId}?wait=5`).expect(200);
    assert.equal(task.body.type, 'export');
    assert.equal(task.body.status, 'success');
    assert.equal(task.body.bytes_done, SIZE);
  });

  test('a ranged GET is no task: no X-Task-Id, no task row, counted in /metrics instead', async () => {
    const vdiId = url.split('/')[3];
    const tasksBefore = (await request(srv.url).get(`/v1/tasks?vdi=${vdiId}&limit=1000`).expect(200)).body
      .length;
    const before = await scrape(srv.url);
    for (const format of ['raw', 'vhd', 'qcow2']) {
      const res = await request(srv.url)
        .get(`${url}?format=${format}`)
        .set('Range', 'bytes=0-1023')
        .buffer(true)
        .expect(206);
      assert.equal(res.headers['x-task-id'], undefined, `${format}: no task, no X-Task-Id`);
      assert.equal(res.body.length, 1024);
    }
    const after = await scrape(srv.url);
    const tasksAfter = (await request(srv.url).get(`/v1/tasks?vdi=${vdiId}&limit=1000`).expect(200)).body
      .length;
    assert.equal(tasksAfter, tasksBefore, 'no task was recorded for a part of the disk');
    for (const format of ['raw', 'vhd', 'qcow2']) {
      const delta = (name: string) =>
        (sample(after, name, { format }) ?? 0) - (sample(before, name, { format }) ?? 0);
      assert.equal(delta('diskport_read_requests_total'), 1, `${format}: one read request`);
      assert.equal(delta('diskport_read_bytes_total'), 1024, `${format}: its bytes`);
      assert.equal(delta('diskport_bytes_sent_total'), 1024, `${format}: bytes sent include ranged reads`);
    }
  });
});
