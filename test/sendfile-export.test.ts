/**
 * Raw exports sent from their files with sendfile (src/http/zero-copy.ts,
 * native/sendfile.c), over real sockets: the bytes are the disk's, whole and
 * ranged, holes included; HEAD and small ranges answer as before; a client
 * that goes away or stops reading, a cancelled task and a commit during the
 * send leave the server serving right bytes; multipart ranges take the
 * stream path. `diskport_sendfile_bytes_total` tells which path a body took.
 * vhd and qcow2 exports: sendfile-formats.test.ts.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { addon } from '../src/image/native.js';
import { api, createVdi, curl, sha256File, sha256Url } from './helpers/api.js';
import { RawClient } from './helpers/raw-client.js';
import {
  lastExportEnded,
  runningExport,
  SENDFILE_DISK_SIZE,
  sendfileDisk,
  sentWithSendfile as sentBySendfile,
  stalledSend,
  taskEnded,
} from './helpers/sendfile.js';
import { seededBytes, startServer, type TestServer, tempDir } from './helpers/server.js';

const MiB = 1024 * 1024;
const SIZE = SENDFILE_DISK_SIZE;

function sha256(buf: Buffer): string {
  return createHash('sha256').update(buf).digest('hex');
}

describe('raw exports sent with sendfile', () => {
  let srv: TestServer;
  let dir: string;
  let source: string;
  let bytes: Buffer;
  let vdiId: string;
  const contents = () => `/v1/vdis/${vdiId}/contents?format=raw`;
  const sentWithSendfile = () => sentBySendfile(srv.url);

  before(async () => {
    // A build/ from before native/sendfile.c has no sendSpans: every body would stream.
    assert.equal(
      typeof addon?.sendSpans,
      'function',
      'the native addon is older than native/sendfile.c: rebuild it (npm run install)',
    );
    srv = await startServer();
    dir = await tempDir();
    bytes = sendfileDisk(7);
    source = path.join(dir, 'disk.img');
    await fsp.writeFile(source, bytes);
    vdiId = (await createVdi(srv.url, SIZE)).id;
    await curl(['-T', source, `${srv.url}${contents()}`]);
  });
  after(async () => {
    await srv.close();
    await fsp.rm(dir, { recursive: true, force: true });
  });

  test('a whole GET is the disk, holes included, sent from the file; the connection serves the next request', async () => {
    const before = await sentWithSendfile();
    const a = path.join(dir, 'a.img');
    const b = path.join(dir, 'b.img');
    // curl reuses the connection for the second URL: the first response's framing was exact.
    const out = await curl([
      '-w',
      '%{num_connects}\\n',
      `${srv.url}${contents()}`,
      '-o',
      a,
      `${srv.url}${contents()}`,
      '-o',
      b,
    ]);
    assert.deepEqual(out.toString().trim().split('\n'), ['1', '0']);
    assert.equal(await sha256File(a), sha256(bytes));
    assert.equal(await sha256File(b), sha256(bytes));
    assert.equal((await sentWithSendfile()) - before, 2 * SIZE);
  });

  test('ranged GETs of a MiB or more are exact, across data and holes and at the disk end', async () => {
    const before = await sentWithSendfile();
    const ranges: [number, number][] = [
      [1, 9 * MiB + 12_345], // data into hole
      [7 * MiB + 5, 21 * MiB + 7], // data, hole, data, hole
      [SIZE - 3 * MiB - 1, SIZE - 1], // to the last byte
    ];
    let sent = 0;
    for (const [start, end] of ranges) {
      const headers = path.join(dir, 'range-headers');
      const body = await curl(['-D', headers, '-r', `${start}-${end}`, `${srv.url}${contents()}`]);
      assert.match(await fsp.readFile(headers, 'utf8'), /^HTTP\/1.1 206/);
      assert.match(
        await fsp.readFile(headers, 'utf8'),
        new RegExp(`Content-Range: bytes ${start}-${end}/${SIZE}`, 'i'),
      );
      assert.equal(sha256(body), sha256(bytes.subarray(start, end + 1)), `bytes ${start}-${end}`);
      sent += end - start + 1;
    }
    // A suffix range too.
    const suffix = await curl(['-r', `-${2 * MiB}`, `${srv.url}${contents()}`]);
    assert.ok(suffix.equals(bytes.subarray(SIZE - 2 * MiB)));
    sent += 2 * MiB;
    assert.equal((await sentWithSendfile()) - before, sent);
  });

  test('HEAD, small ranges and multipart ranges answer through the stream path, unchanged', async () => {
    const before = await sentWithSendfile();
    const head = await fetch(`${srv.url}${contents()}`, { method: 'HEAD' });
    assert.equal(head.status, 200);
    assert.equal(head.headers.get('content-length'), String(SIZE));
    assert.equal((await head.arrayBuffer()).byteLength, 0);
    const small = await curl(['-r', `${8 * MiB - 100}-${8 * MiB + 65_435}`, `${srv.url}${contents()}`]);
    assert.ok(small.equals(bytes.subarray(8 * MiB - 100, 8 * MiB + 65_436)));
    const multi = await fetch(`${srv.url}${contents()}`, {
      headers: { Range: `bytes=0-1048575,${20 * MiB}-${22 * MiB}` },
    });
    assert.equal(multi.status, 206);
    const body = Buffer.from(await multi.arrayBuffer());
    assert.ok(body.includes(bytes.subarray(0, MiB)) && body.includes(bytes.subarray(20 * MiB, 22 * MiB + 1)));
    assert.equal((await sentWithSendfile()) - before, 0);
  });

  test('a client that stops reading holds the send at the socket; it gets every byte once it reads on', async () => {
    const client = new RawClient(srv.url, contents());
    await client.readAtLeast(MiB);
    const t = await runningExport(srv.url);
    // Stalled: bytes_done stops growing, well short of the disk (the socket buffers hold a few MiB).
    const stalled = await stalledSend(srv.url, t.id);
    assert.ok(stalled < SIZE - 8 * MiB, `sent ${stalled} of ${SIZE} to a client that reads nothing`);
    const { head, body } = await client.response();
    assert.match(head, /^HTTP\/1.1 200/);
    assert.equal(sha256(body), sha256(bytes));
    assert.equal((await taskEnded(srv.url, t.id)).status, 'success');
  });

  test('a client that goes away mid-send ends the task; the next GET is whole', async () => {
    for (const when of [2 * MiB, 24 * MiB]) {
      const client = new RawClient(srv.url, contents());
      await client.readAtLeast(when);
      client.destroy();
      await client.closed;
      const gone = await lastExportEnded(srv.url);
      assert.equal(gone.status, 'failure');
      assert.equal(gone.error?.code, 'CLIENT_DISCONNECTED');
    }
    assert.equal(await sha256Url(`${srv.url}${contents()}`), sha256(bytes));
  });

  test('cancelling the export task cuts the connection short, never with wrong bytes', async () => {
    const client = new RawClient(srv.url, contents());
    await client.readAtLeast(MiB);
    const t = await runningExport(srv.url);
    assert.equal((await api(srv.url, 'POST', `/v1/tasks/${t.id}/cancel`)).status, 202);
    const { body } = await client.response();
    assert.ok(body.length < SIZE, 'the body is cut short');
    assert.ok(body.equals(bytes.subarray(0, body.length)), 'what arrived is the disk');
    assert.equal((await taskEnded(srv.url, t.id)).status, 'cancelled');
  });

  test('a commit during the send: the GET keeps the old bytes, the next GET has the new', async () => {
    const other = (await createVdi(srv.url, SIZE)).id;
    await curl(['-T', source, `${srv.url}/v1/vdis/${other}/contents?format=raw`]);
    const client = new RawClient(srv.url, `/v1/vdis/${other}/contents?format=raw`);
    await client.readAtLeast(MiB);
    const next = sendfileDisk(99);
    const nextFile = path.join(dir, 'next.img');
    await fsp.writeFile(nextFile, next);
    await curl(['-T', nextFile, `${srv.url}/v1/vdis/${other}/contents?format=raw`]);
    const { body } = await client.response();
    assert.equal(sha256(body), sha256(bytes));
    assert.equal(await sha256Url(`${srv.url}/v1/vdis/${other}/contents?format=raw`), sha256(next));
  });

  test('a layered VDI (after a snapshot) sends each range from the layer holding it', async () => {
    const layered = (await createVdi(srv.url, SIZE)).id;
    await curl(['-T', source, `${srv.url}/v1/vdis/${layered}/contents?format=raw`]);
    assert.equal((await api(srv.url, 'POST', `/v1/vdis/${layered}/snapshots`)).status, 201);
    const next = Buffer.from(bytes);
    seededBytes(3 * MiB, 123).copy(next, 6 * MiB); // over data and hole
    next.fill(0, 40 * MiB, 41 * MiB); // zeros over data
    const nextFile = path.join(dir, 'layered.img');
    await fsp.writeFile(nextFile, next);
    await curl(['-T', nextFile, `${srv.url}/v1/vdis/${layered}/contents?format=raw`]);
    const before = await sentWithSendfile();
    assert.equal(await sha256Url(`${srv.url}/v1/vdis/${layered}/contents?format=raw`), sha256(next));
    const part = await curl([
      '-r',
      `${5 * MiB}-${41 * MiB + 3}`,
      `${srv.url}/v1/vdis/${layered}/contents?format=raw`,
    ]);
    assert.ok(part.equals(next.subarray(5 * MiB, 41 * MiB + 4)));
    assert.equal((await sentWithSendfile()) - before, SIZE + 36 * MiB + 4);
  });
});
