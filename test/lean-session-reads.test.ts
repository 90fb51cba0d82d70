/**
 * Ranged reads through a download session's url, an imageio read ticket's
 * /images/ url and xapi's /export_raw_vdi take the lean read
 * (src/http/lean-read.ts) once their own checks have passed: each answer
 * (status, headers, body) equals, byte for byte, the stream path's answer to
 * the same request (forced here by an If-None-Match that names no ETag, which
 * the lean read leaves to the stream path and which changes nothing else),
 * and a session's task still counts the bytes served.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { api } from './helpers/api.js';
import { seededBytes, startServer, type TestServer } from './helpers/server.js';

const MiB = 1024 * 1024;
/** Not a whole number of VHD blocks or qcow2 clusters: both pad their last one. */
const SIZE = 3 * MiB + 4096;
const FORCE_STREAM = { 'If-None-Match': '"no-such-etag"' };

interface Answer {
  status: number;
  headers: Record<string, string>;
  body: Buffer;
}

async function answer(
  url: string,
  init: { method?: string; headers?: Record<string, string> },
): Promise<Answer> {
  const res = await fetch(url, init);
  const headers: Record<string, string> = {};
  // The date and the request's own id differ from one answer to the next.
  for (const [k, v] of res.headers) if (k !== 'date' && k !== 'x-request-id') headers[k] = v;
  return { status: res.status, headers, body: Buffer.from(await res.arrayBuffer()) };
}

/** The ranges a client reads: small ones across the image, its edges, a suffix, and one past the end. */
function specs(size: number): string[] {
  const out = [
    'bytes=0-0',
    'bytes=0-65535',
    `bytes=${MiB - 10}-${MiB + 9}`,
    'bytes=-512',
    `bytes=${size - 70000}-`,
  ];
  for (const at of [511, 2048, 65536, 2 * MiB + 1000, size - 4096]) out.push(`bytes=${at}-${at + 65535}`);
  out.push(`bytes=${size}-`); // not satisfiable
  return out;
}

describe('ranged reads through sessions, tickets and xapi equal the stream path', () => {
  let srv: TestServer;
  let vdi: string;
  const data = seededBytes(SIZE, 5);
  data.fill(0, MiB, 2 * MiB);

  before(async () => {
    srv = await startServer();
    const created = await api<{ id: string }>(srv.url, 'POST', '/v1/vdis', {
      name_label: 'lean-session-reads',
      virtual_size: SIZE,
    });
    vdi = created.body.id;
    const put = await fetch(`${srv.url}/v1/vdis/${vdi}/contents?format=raw`, {
      method: 'PUT',
      body: new Uint8Array(data),
    });
    assert.equal(put.status, 200);
  });
  after(() => srv.close());

  /** Every spec read lean and through the stream path: the same answers. */
  async function compare(url: string, size: number, what: string): Promise<number> {
    await answer(url, { headers: { Range: 'bytes=0-0' } }); // opens the image and lays out the export
    let served = 0;
    for (const range of specs(size)) {
      const lean = await answer(url, { headers: { Range: range } });
      const stream = await answer(url, { headers: { Range: range, ...FORCE_STREAM } });
      assert.deepEqual(lean.headers, stream.headers, `${what} ${range}`);
      assert.equal(lean.status, stream.status, `${what} ${range}`);
      assert.ok(lean.body.equals(stream.body), `${what} ${range}: bodies differ`);
      if (lean.status === 206) served += lean.body.length;
    }
    const heads: Record<string, string>[] = [{}, { Range: 'bytes=10-19' }];
    for (const headers of heads) {
      const lean = await answer(url, { method: 'HEAD', headers });
      const stream = await answer(url, { method: 'HEAD', headers: { ...headers, ...FORCE_STREAM } });
      assert.deepEqual(lean, stream, `${what} HEAD ${JSON.stringify(headers)}`);
    }
    return served;
  }

  for (const format of ['raw', 'vhd', 'qcow2']) {
    test(`a download session's url (${format})`, async () => {
      const opened = await api<{ id: string; url: string; task_id: string; size: number | null }>(
        srv.url,
        'POST',
        '/v1/transfers',
        { vdi, direction: 'download', format },
      );
      assert.equal(opened.status, 201, JSON.stringify(opened.body));
      const url = opened.body.url.startsWith('http') ? opened.body.url : srv.url + opened.body.url;
      const whole = await answer(`${srv.url}/v1/vdis/${vdi}/contents?format=${format}`, {});
      const served = await compare(url, whole.body.length, `session ${format}`);
      // Both paths count toward the session's task: twice the lean bytes, plus the first read's byte.
      const task = await api<{ bytes_done: number }>(srv.url, 'GET', `/v1/tasks/${opened.body.task_id}`);
      assert.equal(task.body.bytes_done, 2 * served + 1);
      const first = await answer(url, { headers: { Range: 'bytes=100-199' } });
      assert.equal(first.headers['x-task-id'], opened.body.task_id);
      assert.ok(first.body.equals(whole.body.subarray(100, 200)));
      await api(srv.url, 'DELETE', `/v1/transfers/${opened.body.id}`);
    });
  }

  test("an imageio read ticket's /images/ url", async () => {
    const id = randomUUID();
    const installed = await api(srv.url, 'PUT', `/v1/imageio/tickets/${id}`, {
      uuid: id,
      size: SIZE,
      url: `vdi:${vdi}`,
      ops: ['read'],
      timeout: 300,
      inactivity_timeout: 120,
      sparse: true,
    });
    assert.equal(installed.status, 200, JSON.stringify(installed.body));
    const url = `${srv.url}/images/${id}`;
    await compare(url, SIZE, 'ticket');
    const r = await answer(url, { headers: { Range: `bytes=${2 * MiB}-${2 * MiB + 65535}` } });
    assert.equal(r.headers['content-range'], `bytes ${2 * MiB}-${2 * MiB + 65535}/*`);
    assert.ok(r.body.equals(data.subarray(2 * MiB, 2 * MiB + 65536)));
    assert.equal((await api(srv.url, 'DELETE', `/v1/imageio/tickets/${id}`)).status, 204);
  });

  for (const format of ['raw', 'vhd', 'qcow2']) {
    test(`xapi's /export_raw_vdi (${format})`, async () => {
      const whole = await answer(`${srv.url}/v1/vdis/${vdi}/contents?format=${format}`, {});
      await compare(
        `${srv.url}/export_raw_vdi?vdi=${vdi}&format=${format}`,
        whole.body.length,
        `xapi ${format}`,
      );
      const r = await answer(`${srv.url}/export_raw_vdi?vdi=${vdi}&format=${format}`, {
        headers: { Range: 'bytes=4096-8191' },
      });
      assert.ok(r.body.equals(whole.body.subarray(4096, 8192)));
    });
  }
});
