import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { createReadStream, promises as fsp } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import * as tus from 'tus-js-client';
import { api, createVdi, curl, execFileP, sha256File, sha256Url } from './helpers/api.js';
import { seededBytes, startServer, type TestServer, tempDir } from './helpers/server.js';

const MiB = 1024 * 1024;
const TUS = { 'tus-resumable': '1.0.0' };
type ErrorBody = { error: { code: string; message: string; details?: Record<string, unknown> } };

const b64 = (s: string) => Buffer.from(s).toString('base64');
const metadataHeader = (m: Record<string, string>) =>
  Object.entries(m)
    .map(([k, v]) => `${k} ${b64(v)}`)
    .join(',');
const digest = (algorithm: string, data: Buffer) => createHash(algorithm).update(data).digest('base64');

/** Runs a tus-js-client upload to its end; rejects with the client's error. */
function upload(input: Buffer | ReturnType<typeof createReadStream>, options: tus.UploadOptions) {
  return new Promise<tus.Upload>((resolve, reject) => {
    const u = new tus.Upload(input, {
      retryDelays: null,
      ...options,
      onSuccess: () => resolve(u),
      onError: reject,
    });
    u.start();
  });
}

async function tusPost(base: string, length: number, metadata: Record<string, string>) {
  const res = await fetch(`${base}/v1/tus/`, {
    method: 'POST',
    headers: { ...TUS, 'upload-length': String(length), 'upload-metadata': metadataHeader(metadata) },
  });
  assert.equal(res.status, 201, await res.text());
  return res.headers.get('location')!;
}

function tusPatch(url: string, offset: number, body: Buffer, headers: Record<string, string> = {}) {
  return fetch(url, {
    method: 'PATCH',
    headers: {
      ...TUS,
      'upload-offset': String(offset),
      'content-type': 'application/offset+octet-stream',
      ...headers,
    },
    body: new Uint8Array(body),
  });
}

async function headOffset(url: string): Promise<number> {
  const res = await fetch(url, { method: 'HEAD', headers: TUS });
  assert.equal(res.status, 200);
  return Number(res.headers.get('upload-offset'));
}

/** A TCP proxy that cuts every connection once `cutAfter` request bytes went through it (then stops cutting). */
async function cuttingProxy(target: string, cutAfter: number) {
  const { hostname, port } = new URL(target);
  let cuts = 0;
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(port), hostname);
    let sent = 0;
    client.on('data', (d: Buffer) => {
      sent += d.length;
      if (cuts === 0 && sent > cutAfter) {
        cuts++;
        client.destroy();
        upstream.destroy();
        return;
      }
      upstream.write(d);
    });
    upstream.on('data', (d) => client.write(d));
    client.on('error', () => upstream.destroy());
    upstream.on('error', () => client.destroy());
    client.on('close', () => upstream.end());
    upstream.on('close', () => client.end());
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const { port: proxyPort } = server.address() as net.AddressInfo;
  return {
    url: `http://127.0.0.1:${proxyPort}`,
    cuts: () => cuts,
    close: () => new Promise((r) => server.close(r)),
  };
}

describe('tus 1.0 uploads at /v1/tus/', () => {
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

  test('OPTIONS names the version, the extensions and the checksum algorithms', async () => {
    const res = await fetch(`${srv.url}/v1/tus/`, { method: 'OPTIONS' });
    assert.equal(res.status, 204);
    assert.equal(res.headers.get('tus-version'), '1.0.0');
    assert.deepEqual(res.headers.get('tus-extension')?.split(',').sort(), [
      'checksum',
      'creation',
      'creation-with-upload',
      'expiration',
      'termination',
    ]);
    assert.deepEqual(res.headers.get('tus-checksum-algorithm')?.split(',').sort(), ['md5', 'sha1', 'sha256']);
  });

  test('tus-js-client uploads 24 MiB through a proxy that cuts the connection, resumes, and the VDI has the same bytes', async () => {
    const size = 24 * MiB;
    const source = path.join(dir, 'random-24MiB.img');
    await fsp.writeFile(source, seededBytes(size, 24));
    const vdi = await createVdi(srv.url, size);
    const proxy = await cuttingProxy(srv.url, 9 * MiB);
    try {
      let uploadUrl: string | null = null;
      const first = new tus.Upload(createReadStream(source), {
        endpoint: `${proxy.url}/v1/tus/`,
        metadata: { vdi: vdi.id, format: 'raw' },
        retryDelays: null,
        onUploadUrlAvailable: () => {
          uploadUrl = first.url;
        },
      });
      await assert.rejects(
        new Promise((resolve, reject) => {
          first.options.onSuccess = () => resolve(undefined);
          first.options.onError = reject;
          first.start();
        }),
        'the first attempt is cut off',
      );
      assert.equal(proxy.cuts(), 1);
      assert.ok(uploadUrl, 'the upload was created before the cut');
      const id = (uploadUrl as string).split('/').pop()!;

      // The server kept what arrived before the cut (the PATCH ends as soon as it notices).
      let offset = 0;
      for (let i = 0; i < 50 && offset === 0; i++) {
        offset = await headOffset(`${srv.url}/v1/tus/${id}`);
        if (offset === 0) await new Promise((r) => setTimeout(r, 100));
      }
      assert.ok(offset > 0 && offset < size, `Upload-Offset ${offset} after the cut`);

      let resumedFrom = -1;
      const second = await upload(createReadStream(source), {
        uploadUrl,
        metadata: { vdi: vdi.id, format: 'raw' },
        retryDelays: [0, 200, 500],
        onBeforeRequest: (req) => {
          if (req.getMethod() === 'PATCH' && resumedFrom < 0)
            resumedFrom = Number(req.getHeader('Upload-Offset'));
        },
      });
      assert.equal(second.url, uploadUrl);
      assert.ok(resumedFrom >= offset, `resumed at ${resumedFrom}, not from 0`);

      const transfer = await api<{ state: string; size: number; task_id: string }>(
        srv.url,
        'GET',
        `/v1/transfers/${id}`,
      );
      assert.equal(transfer.body.state, 'committed', 'the last PATCH answers after the commit');
      assert.equal(transfer.body.size, size);
      const task = await api<{ status: string }>(srv.url, 'GET', `/v1/tasks/${transfer.body.task_id}`);
      assert.equal(task.body.status, 'success');
      assert.equal(
        await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents?format=raw`),
        await sha256File(source),
      );
    } finally {
      await proxy.close();
    }
  });

  test('a qcow2 made by qemu-img, sent in 1 MiB PATCHes, lands byte-exact (qemu-img compare)', async () => {
    const size = 32 * MiB;
    const raw = path.join(dir, 'sparse.raw');
    const h = await fsp.open(raw, 'w');
    await h.truncate(size);
    for (let i = 0; i < 6; i++)
      await h.write(seededBytes(700 * 1024, 60 + i), 0, 700 * 1024, i * 5 * MiB + 4096 * i);
    await h.close();
    const qcow2 = path.join(dir, 'sparse.qcow2');
    await execFileP('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2]);
    const vdi = await createVdi(srv.url, size);

    const done = await upload(await fsp.readFile(qcow2), {
      endpoint: `${srv.url}/v1/tus/`,
      metadata: { vdi: vdi.id, format: 'qcow2' },
      chunkSize: MiB,
    });
    const id = done.url!.split('/').pop()!;
    const transfer = await api<{ state: string; format: string }>(srv.url, 'GET', `/v1/transfers/${id}`);
    assert.deepEqual([transfer.body.state, transfer.body.format], ['committed', 'qcow2']);

    const exported = path.join(dir, 'exported.raw');
    await curl(['-o', exported, `${srv.url}/v1/vdis/${vdi.id}/contents?format=raw`]);
    await execFileP('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', exported, raw]);
  });

  test('HEAD gives Upload-Offset and Upload-Length; Upload-Checksum is verified per PATCH (460, bytes discarded)', async () => {
    const data = seededBytes(2 * MiB, 7);
    const vdi = await createVdi(srv.url, 2 * MiB);
    const url = await tusPost(srv.url, data.length, { vdi: vdi.id });
    const head = await fetch(url, { method: 'HEAD', headers: TUS });
    assert.equal(head.status, 200);
    assert.equal(head.headers.get('upload-offset'), '0');
    assert.equal(head.headers.get('upload-length'), String(2 * MiB));
    assert.equal(head.headers.get('cache-control'), 'no-store');

    const first = data.subarray(0, MiB);
    const ok = await tusPatch(url, 0, first, { 'upload-checksum': `sha1 ${digest('sha1', first)}` });
    assert.equal(ok.status, 204);
    assert.equal(ok.headers.get('upload-offset'), String(MiB));
    assert.ok(ok.headers.get('upload-expires'), 'expiration: Upload-Expires on PATCH');

    const second = data.subarray(MiB);
    const wrong = await tusPatch(url, MiB, second, {
      'upload-checksum': `sha256 ${digest('sha256', Buffer.from('not these bytes'))}`,
    });
    assert.equal(wrong.status, 460);
    assert.equal(((await wrong.json()) as ErrorBody).error.code, 'UPLOAD_CHECKSUM_MISMATCH');
    assert.equal(await headOffset(url), MiB, 'the mismatching body was discarded');

    const unknown = await tusPatch(url, MiB, second, { 'upload-checksum': 'crc32 AAAAAA==' });
    assert.equal(unknown.status, 400);
    assert.equal(((await unknown.json()) as ErrorBody).error.code, 'UNSUPPORTED_CHECKSUM_ALGORITHM');

    const conflict = await tusPatch(url, 0, second);
    assert.equal(conflict.status, 409, 'an Upload-Offset other than the server one');
    assert.equal(((await conflict.json()) as ErrorBody).error.code, 'OFFSET_MISMATCH');

    const last = await tusPatch(url, MiB, second, { 'upload-checksum': `md5 ${digest('md5', second)}` });
    assert.equal(last.status, 204);
    assert.equal(last.headers.get('upload-offset'), String(2 * MiB));
    const task = await api<{ status: string }>(srv.url, 'GET', `/v1/tasks/${last.headers.get('x-task-id')}`);
    assert.equal(task.body.status, 'success');
    assert.equal(
      await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`),
      createHash('sha256').update(data).digest('hex'),
    );
  });

  test('creation-with-upload: a POST carrying the whole body commits before it answers', async () => {
    const data = seededBytes(MiB, 8);
    const vdi = await createVdi(srv.url, MiB);
    const res = await fetch(`${srv.url}/v1/tus/`, {
      method: 'POST',
      headers: {
        ...TUS,
        'upload-length': String(data.length),
        'upload-metadata': metadataHeader({ vdi: vdi.id, format: 'raw' }),
        'content-type': 'application/offset+octet-stream',
      },
      body: new Uint8Array(data),
    });
    assert.equal(res.status, 201);
    assert.equal(res.headers.get('upload-offset'), String(data.length));
    const task = await api<{ status: string }>(srv.url, 'GET', `/v1/tasks/${res.headers.get('x-task-id')}`);
    assert.equal(task.body.status, 'success');
    assert.equal(
      await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`),
      createHash('sha256').update(data).digest('hex'),
    );
  });

  test('DELETE terminates the upload and leaves the VDI as it was', async () => {
    const before = seededBytes(MiB, 9);
    const vdi = await createVdi(srv.url, MiB);
    const put = await fetch(`${srv.url}/v1/vdis/${vdi.id}/contents?format=raw`, {
      method: 'PUT',
      body: new Uint8Array(before),
    });
    assert.equal(put.status, 200);
    const url = await tusPost(srv.url, MiB, { vdi: vdi.id });
    assert.equal((await tusPatch(url, 0, seededBytes(MiB / 2, 10))).status, 204);

    const del = await fetch(url, { method: 'DELETE', headers: TUS });
    assert.equal(del.status, 204);
    const gone = await fetch(url, { method: 'HEAD', headers: TUS });
    assert.equal(gone.status, 410);
    const late = await tusPatch(url, MiB / 2, seededBytes(MiB / 2, 10));
    assert.equal(late.status, 410);
    assert.equal(((await late.json()) as ErrorBody).error.code, 'UPLOAD_GONE');
    const id = url.split('/').pop()!;
    const transfer = await api<{ state: string }>(srv.url, 'GET', `/v1/transfers/${id}`);
    assert.equal(transfer.body.state, 'cancelled');
    assert.equal(
      await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`),
      createHash('sha256').update(before).digest('hex'),
    );
    // The VDI is free again: a new upload may start.
    await tusPost(srv.url, MiB, { vdi: vdi.id });
  });

  test('a whole-stream checksum in Upload-Metadata that does not match fails the last PATCH; the VDI is unchanged', async () => {
    const data = seededBytes(MiB, 11);
    const vdi = await createVdi(srv.url, MiB);
    const url = await tusPost(srv.url, data.length, {
      vdi: vdi.id,
      checksum: `sha256:${'0'.repeat(64)}`,
    });
    const res = await tusPatch(url, 0, data);
    assert.equal(res.status, 400);
    const body = (await res.json()) as ErrorBody;
    assert.equal(body.error.code, 'CHECKSUM_MISMATCH');
    assert.ok(body.error.details?.task_id);
    assert.equal(
      await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`),
      createHash('sha256').update(Buffer.alloc(MiB)).digest('hex'),
    );
  });

  test('creation refuses what cannot be imported, with JSON errors', async () => {
    const vdi = await createVdi(srv.url, MiB);
    const post = (length: number, metadata: Record<string, string>) =>
      api<ErrorBody>(srv.url, 'POST', '/v1/tus/', undefined, {
        ...TUS,
        'upload-length': String(length),
        'upload-metadata': metadataHeader(metadata),
      });

    const noVdi = await post(MiB, { format: 'raw' });
    assert.equal(noVdi.status, 400);
    assert.equal(noVdi.body.error.code, 'VDI_REQUIRED');

    const tooLarge = await post(2 * MiB, { vdi: vdi.id, format: 'raw' });
    assert.equal(tooLarge.status, 413);
    assert.equal(tooLarge.body.error.code, 'TOO_LARGE');

    const badFormat = await post(MiB, { vdi: vdi.id, format: 'vmdk' });
    assert.equal(badFormat.status, 400);
    assert.equal(badFormat.body.error.code, 'FORMAT_NOT_SUPPORTED');

    const unknownVdi = await post(MiB, { vdi: 'no-such-vdi' });
    assert.equal(unknownVdi.status, 404);

    const noVersion = await api<ErrorBody>(srv.url, 'POST', '/v1/tus/', undefined, {
      'upload-length': '1',
      'upload-metadata': metadataHeader({ vdi: vdi.id }),
    });
    assert.equal(noVersion.status, 412);
    assert.equal(noVersion.body.error.code, 'TUS_VERSION_UNSUPPORTED');
    assert.equal(noVersion.headers.get('tus-version'), '1.0.0');

    const unknownUpload = await api<ErrorBody>(srv.url, 'HEAD', '/v1/tus/no-such-upload', undefined, TUS);
    assert.equal(unknownUpload.status, 404);
  });
});

describe('tus requests framed against tus 1.0 are refused, and nothing lands', () => {
  let srv: TestServer;
  let url: string;
  before(async () => {
    srv = await startServer();
    const vdi = await createVdi(srv.url, MiB);
    url = await tusPost(srv.url, MiB, { vdi: vdi.id });
  });
  after(() => srv.close());

  const body = seededBytes(4096, 13);
  async function refused(res: Response, status: number, code: string): Promise<ErrorBody> {
    const text = await res.text();
    assert.equal(res.status, status, text);
    const parsed = JSON.parse(text) as ErrorBody;
    assert.equal(parsed.error.code, code);
    assert.equal(await headOffset(url), 0, 'the refused request wrote nothing');
    return parsed;
  }

  test('another Tus-Resumable, or none, is 412 TUS_VERSION_UNSUPPORTED naming the version spoken', async () => {
    const framing = { 'upload-offset': '0', 'content-type': 'application/offset+octet-stream' };
    for (const version of ['0.2.2', '2.0.0', null]) {
      const res = await fetch(url, {
        method: 'PATCH',
        headers: version === null ? framing : { ...framing, 'tus-resumable': version },
        body: new Uint8Array(body),
      });
      assert.equal(res.headers.get('tus-version'), '1.0.0', String(version));
      const err = await refused(res, 412, 'TUS_VERSION_UNSUPPORTED');
      assert.match(err.error.message, /Tus-Resumable: 1\.0\.0/);
    }
    const create = await fetch(`${srv.url}/v1/tus/`, {
      method: 'POST',
      headers: { 'tus-resumable': '0.2.2', 'upload-length': String(MiB) },
    });
    await refused(create, 412, 'TUS_VERSION_UNSUPPORTED');
  });

  test('a PATCH body of another Content-Type is 415 UNSUPPORTED_MEDIA_TYPE', async () => {
    const res = await tusPatch(url, 0, body, { 'content-type': 'application/octet-stream' });
    const err = await refused(res, 415, 'UNSUPPORTED_MEDIA_TYPE');
    assert.match(err.error.message, /application\/offset\+octet-stream/);
  });

  test('a PATCH without Upload-Offset, or a POST with a bad Upload-Length or Upload-Metadata, is 400 INVALID_TUS_REQUEST', async () => {
    const noOffset = await fetch(url, {
      method: 'PATCH',
      headers: { ...TUS, 'content-type': 'application/offset+octet-stream' },
      body: new Uint8Array(body),
    });
    await refused(noOffset, 400, 'INVALID_TUS_REQUEST');
    for (const headers of [
      { 'upload-length': 'ten', 'upload-metadata': metadataHeader({ vdi: 'x' }) },
      { 'upload-length': '-1', 'upload-metadata': metadataHeader({ vdi: 'x' }) },
      { 'upload-length': String(MiB), 'upload-metadata': 'vdi !!not-base64!!' },
    ]) {
      const res = await fetch(`${srv.url}/v1/tus/`, { method: 'POST', headers: { ...TUS, ...headers } });
      await refused(res, 400, 'INVALID_TUS_REQUEST');
    }
  });

  test('an Upload-Checksum that is not <algorithm> <base64 digest> is 400 INVALID_UPLOAD_CHECKSUM', async () => {
    for (const header of [
      'sha256',
      `sha256 ${digest('sha1', body)}`,
      'sha256 not*base64',
      `${digest('sha256', body)}`,
    ]) {
      const res = await tusPatch(url, 0, body, { 'upload-checksum': header });
      await refused(res, 400, 'INVALID_UPLOAD_CHECKSUM');
    }
    const right = await tusPatch(url, 0, body, { 'upload-checksum': `sha256 ${digest('sha256', body)}` });
    assert.equal(right.status, 204, 'the same body with a well-formed Upload-Checksum lands');
    assert.equal(await headOffset(url), body.length);
    // Back to the state the other tests expect: a fresh upload at offset 0.
    const vdi = await createVdi(srv.url, MiB);
    url = await tusPost(srv.url, MiB, { vdi: vdi.id });
  });

  test('Upload-Concat and Upload-Defer-Length are 501 NOT_IMPLEMENTED', async () => {
    const vdi = await createVdi(srv.url, MiB);
    const metadata = metadataHeader({ vdi: vdi.id });
    const refusedHeaders: Record<string, string>[] = [
      { 'upload-concat': 'partial', 'upload-length': String(MiB), 'upload-metadata': metadata },
      { 'upload-defer-length': '1', 'upload-metadata': metadata },
    ];
    for (const headers of refusedHeaders) {
      const res = await fetch(`${srv.url}/v1/tus/`, { method: 'POST', headers: { ...TUS, ...headers } });
      await refused(res, 501, 'NOT_IMPLEMENTED');
    }
    // Nothing was created: the VDI is free for an upload.
    await tusPost(srv.url, MiB, { vdi: vdi.id });
  });

  test("a download transfer's id is no tus upload: 404 UPLOAD_NOT_FOUND", async () => {
    const vdi = await createVdi(srv.url, MiB);
    const download = await api<{ id: string }>(srv.url, 'POST', '/v1/transfers', {
      vdi: vdi.id,
      direction: 'download',
    });
    assert.equal(download.status, 201, JSON.stringify(download.body));
    const res = await tusPatch(`${srv.url}/v1/tus/${download.body.id}`, 0, body);
    assert.equal(res.status, 404);
    assert.equal(((await res.json()) as ErrorBody).error.code, 'UPLOAD_NOT_FOUND');
    const head = await fetch(`${srv.url}/v1/tus/${download.body.id}`, { method: 'HEAD', headers: TUS });
    assert.equal(head.status, 404);
  });
});

describe('tus with a service token', () => {
  let srv: TestServer;
  before(async () => {
    srv = await startServer({ token: 'tus-secret' });
  });
  after(() => srv.close());

  test('needs the bearer token, which tus-js-client sends as a header', async () => {
    const auth = { authorization: 'Bearer tus-secret' };
    const created = await api<{ id: string }>(
      srv.url,
      'POST',
      '/v1/vdis',
      { name_label: 'tus', virtual_size: MiB },
      auth,
    );
    const refused = await api<ErrorBody>(srv.url, 'POST', '/v1/tus/', undefined, {
      ...TUS,
      'upload-length': String(MiB),
      'upload-metadata': metadataHeader({ vdi: created.body.id }),
    });
    assert.equal(refused.status, 401);

    const data = seededBytes(MiB, 12);
    await upload(data, {
      endpoint: `${srv.url}/v1/tus/`,
      headers: auth,
      metadata: { vdi: created.body.id },
    });
    assert.equal(
      await sha256Url(`${srv.url}/v1/vdis/${created.body.id}/contents`, auth),
      createHash('sha256').update(data).digest('hex'),
    );
  });
});
