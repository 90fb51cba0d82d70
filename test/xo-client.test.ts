/**
 * Xen Orchestra as a client of the xapi aliases: the empty probe it sends
 * before every upload changes nothing (in any format, and on /v1 too), and an
 * upload of unknown length (declared as 1 PiB, ended by closing its half of
 * the connection) is read to its end.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { promises as fsp } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { api, createVdi, curl, execFileP, sha256File } from './helpers/api.js';
import { seededBytes, startServer, type TestServer, tempDir } from './helpers/server.js';

const MiB = 1024 * 1024;
const SIZE = 8 * MiB;
/** What Xen Orchestra declares when it does not know an upload's length. */
const XO_UNKNOWN_LENGTH = '1125899906842624';
const QEMU_FORMAT = { raw: 'raw', vhd: 'vpc', qcow2: 'qcow2' } as const;

type Task = {
  id: string;
  type: string;
  status: string;
  error: { code: string } | null;
  result: Record<string, unknown> | null;
};
type Vdi = { id: string; generation: number };

interface RawResponse {
  status: number;
  headers: Record<string, string>;
  body: Buffer;
}

/**
 * Sends `head` and `body` on a socket of its own, then closes the sending
 * half (as Xen Orchestra ends an upload of unknown length), and reads the
 * answer until the server closes the connection.
 */
async function halfCloseRequest(url: string, head: string, body: Buffer): Promise<RawResponse> {
  const { hostname, port } = new URL(url);
  const socket = net.connect(Number(port), hostname);
  await once(socket, 'connect');
  const chunks: Buffer[] = [];
  socket.on('data', (c: Buffer) => chunks.push(c));
  socket.on('error', () => {}); // a reset after the answer is read is of no interest
  socket.write(head);
  socket.end(body);
  await once(socket, 'close');
  const all = Buffer.concat(chunks);
  const split = all.indexOf('\r\n\r\n');
  assert.ok(split > 0, `no HTTP answer: ${JSON.stringify(all.toString('latin1').slice(0, 200))}`);
  const [statusLine, ...lines] = all.subarray(0, split).toString('latin1').split('\r\n');
  const headers = Object.fromEntries(
    lines.map((l) => [l.slice(0, l.indexOf(':')).toLowerCase(), l.slice(l.indexOf(':') + 1).trim()]),
  );
  return { status: Number(statusLine.split(' ')[1]), headers, body: all.subarray(split + 4) };
}

describe("Xen Orchestra's empty probe and unknown-length uploads", () => {
  let srv: TestServer;
  let dir: string;
  let disk: string;
  const images: Record<string, string> = {};
  before(async () => {
    srv = await startServer();
    dir = await tempDir();
    disk = path.join(dir, 'disk.raw');
    const h = await fsp.open(disk, 'w');
    await h.truncate(SIZE);
    for (const at of [0, 3 * MiB + 512, SIZE - MiB]) await h.write(seededBytes(MiB, at), 0, MiB, at);
    await h.close();
    for (const format of ['raw', 'vhd', 'qcow2'] as const) {
      images[format] = path.join(dir, `disk.${format}`);
      if (format !== 'raw') {
        await execFileP('qemu-img', [
          'convert',
          '-f',
          'raw',
          '-O',
          QEMU_FORMAT[format],
          disk,
          images[format],
        ]);
      }
    }
    images.raw = disk;
  });
  after(async () => {
    await srv.close();
    await fsp.rm(dir, { recursive: true, force: true });
  });

  /** A VDI holding `disk`, and its generation. */
  async function filledVdi(): Promise<Vdi> {
    const vdi = await createVdi(srv.url, SIZE);
    await curl(['-T', disk, `${srv.url}/v1/vdis/${vdi.id}/contents?format=raw`]);
    return (await api<Vdi>(srv.url, 'GET', `/v1/vdis/${vdi.id}`)).body;
  }

  async function assertHoldsDisk(vdi: Vdi, generation: number): Promise<void> {
    assert.equal((await api<Vdi>(srv.url, 'GET', `/v1/vdis/${vdi.id}`)).body.generation, generation);
    const out = path.join(dir, `check-${vdi.id}.raw`);
    await curl(['-o', out, `${srv.url}/v1/vdis/${vdi.id}/contents?format=raw`]);
    assert.equal(await sha256File(out), await sha256File(disk), 'the VDI still holds its disk');
  }

  const routes = [
    {
      name: 'PUT /v1/vdis/{id}/contents',
      url: (vdi: string, f: string) => `/v1/vdis/${vdi}/contents?format=${f}`,
    },
    {
      name: 'PUT /import_raw_vdi/ (as Xen Orchestra writes it)',
      url: (vdi: string, f: string) => `/import_raw_vdi/?format=${f}&vdi=${vdi}&session_id=OpaqueRef:x`,
    },
  ];
  for (const route of routes) {
    for (const format of ['raw', 'vhd', 'qcow2']) {
      test(`${route.name}, format=${format}: an empty body (Content-Length: 0, or chunked as curl -T /dev/null) changes nothing`, async () => {
        const vdi = await filledVdi();
        const url = srv.url + route.url(vdi.id, format);
        const sized = await fetch(url, { method: 'PUT', body: '' });
        assert.equal(sized.headers.get('content-length') !== null, true);
        const task = (await sized.json()) as Task;
        assert.equal(sized.status, 200, JSON.stringify(task));
        assert.equal(task.type, 'import');
        assert.equal(task.status, 'success');
        assert.deepEqual(task.result, {
          vdi: vdi.id,
          format,
          generation: vdi.generation,
          bytes_received: 0,
          unchanged: true,
        });
        assert.equal(sized.headers.get('location'), `/v1/tasks/${task.id}`);
        // curl -T names the file after a URL ending in '/', so it is given the path without one.
        const chunked = JSON.parse(
          (await curl(['-T', '/dev/null', url.replace('/?', '?')])).toString(),
        ) as Task;
        assert.equal(chunked.status, 'success');
        assert.equal(chunked.result?.unchanged, true);
        await assertHoldsDisk(vdi, vdi.generation);
      });
    }
  }

  test('the probe is answered as the upload after it would be: unknown VDI 404, busy VDI 409', async () => {
    const unknown = await fetch(`${srv.url}/import_raw_vdi?vdi=nope&format=vhd`, { method: 'PUT', body: '' });
    assert.equal(unknown.status, 404);
    const vdi = await filledVdi();
    const session = await api<{ id: string }>(srv.url, 'POST', '/v1/transfers', {
      vdi: vdi.id,
      direction: 'upload',
    });
    assert.equal(session.status, 201);
    const busy = await fetch(`${srv.url}/import_raw_vdi?vdi=${vdi.id}&format=vhd`, {
      method: 'PUT',
      body: '',
    });
    assert.equal(busy.status, 409);
    assert.equal(((await busy.json()) as { error: { code: string } }).error.code, 'VDI_BUSY');
    await api(srv.url, 'DELETE', `/v1/transfers/${session.body.id}`);
  });

  test('probe then upload, as Xen Orchestra does it, in every format', async () => {
    for (const format of ['raw', 'vhd', 'qcow2'] as const) {
      const vdi = await createVdi(srv.url, SIZE);
      const url = `${srv.url}/import_raw_vdi/?format=${format}&vdi=${vdi.id}`;
      assert.equal((await fetch(url, { method: 'PUT', body: '' })).status, 200);
      const task = JSON.parse(
        (await curl(['-T', images[format], url.replace('/?', '?')])).toString(),
      ) as Task;
      assert.equal(task.status, 'success', format);
      const out = path.join(dir, `probed-${format}.raw`);
      await curl(['-o', out, `${srv.url}/export_raw_vdi?vdi=${vdi.id}&format=raw`]);
      assert.equal(await sha256File(out), await sha256File(disk), format);
    }
  });

  for (const format of ['raw', 'vhd', 'qcow2'] as const) {
    test(`an upload declared as 1 PiB and ended by closing the connection imports (${format})`, async () => {
      const vdi = await createVdi(srv.url, SIZE);
      const body = await fsp.readFile(images[format]);
      const res = await halfCloseRequest(
        srv.url,
        `PUT /import_raw_vdi/?format=${format}&vdi=${vdi.id}&session_id=OpaqueRef:x HTTP/1.1\r\n` +
          `Host: diskport\r\nContent-Length: ${XO_UNKNOWN_LENGTH}\r\n\r\n`,
        body,
      );
      assert.equal(res.status, 200, res.body.toString());
      assert.equal(res.headers.connection, 'close');
      const task = JSON.parse(res.body.toString()) as Task;
      assert.equal(task.status, 'success');
      assert.equal(task.result?.bytes_received, body.length);
      const out = path.join(dir, `unknown-length-${format}.raw`);
      await curl(['-o', out, `${srv.url}/export_raw_vdi?vdi=${vdi.id}&format=raw`]);
      assert.equal(await sha256File(out), await sha256File(disk));
      if (format !== 'raw') {
        const exported = path.join(dir, `unknown-length.${format}`);
        await curl(['-o', exported, `${srv.url}/export_raw_vdi?vdi=${vdi.id}&format=${format}`]);
        await execFileP('qemu-img', ['compare', '-f', QEMU_FORMAT[format], '-F', 'raw', exported, disk]);
      }
    });
  }

  test('an unknown-length upload with no bytes is the probe; one larger than the VDI is 413 and changes nothing', async () => {
    const vdi = await filledVdi();
    const head = (v: string) =>
      `PUT /import_raw_vdi?format=raw&vdi=${v} HTTP/1.1\r\nHost: diskport\r\nContent-Length: ${XO_UNKNOWN_LENGTH}\r\n\r\n`;
    const empty = await halfCloseRequest(srv.url, head(vdi.id), Buffer.alloc(0));
    assert.equal(empty.status, 200, empty.body.toString());
    assert.equal((JSON.parse(empty.body.toString()) as Task).result?.unchanged, true);
    const tooLarge = await halfCloseRequest(srv.url, head(vdi.id), seededBytes(SIZE + 512, 9));
    assert.equal(tooLarge.status, 413, tooLarge.body.toString());
    await assertHoldsDisk(vdi, vdi.generation);
  });

  test('/v1 keeps a declared length as it is: 1 PiB is 413 before any byte is read', async () => {
    const vdi = await createVdi(srv.url, SIZE);
    const res = await halfCloseRequest(
      srv.url,
      `PUT /v1/vdis/${vdi.id}/contents?format=raw HTTP/1.1\r\nHost: diskport\r\nContent-Length: ${XO_UNKNOWN_LENGTH}\r\n\r\n`,
      Buffer.alloc(0),
    );
    assert.equal(res.status, 413);
  });
});
