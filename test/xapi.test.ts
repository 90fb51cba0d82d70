import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { availableFormats } from '../src/formats/index.js';
import { api, createVdi, curl, execFileP, sha256File } from './helpers/api.js';
import { seededBytes, startServer, type TestServer, tempDir } from './helpers/server.js';

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;

/** A raw image with data at a few places and holes between. */
async function writeImage(file: string, seed: number): Promise<void> {
  const h = await fsp.open(file, 'w');
  await h.truncate(SIZE);
  for (const [i, at] of [0, 9 * MiB + 512, 20 * MiB, SIZE - MiB].entries()) {
    await h.write(seededBytes(MiB, seed + i), 0, MiB, at);
  }
  await h.close();
}

describe('xapi-compatible /import_raw_vdi and /export_raw_vdi, without a token', () => {
  let srv: TestServer;
  let dir: string;
  let disk: string;
  before(async () => {
    srv = await startServer();
    dir = await tempDir();
    disk = path.join(dir, 'disk.raw');
    await writeImage(disk, 1);
  });
  after(async () => {
    await srv.close();
    await fsp.rm(dir, { recursive: true, force: true });
  });

  test('the curl commands of the XenServer docs import and export raw, byte-exact', async () => {
    const vdi = (await createVdi(srv.url, SIZE)).id;
    const headers = path.join(dir, 'import-headers');
    const out = await curl([
      '-T',
      disk,
      '-D',
      headers,
      `${srv.url}/import_raw_vdi?session_id=OpaqueRef:abc&vdi=${vdi}&format=raw`,
    ]);
    const task = JSON.parse(out.toString());
    assert.equal(task.status, 'success');
    assert.equal(task.type, 'import');
    const head = await fsp.readFile(headers, 'utf8');
    assert.match(head, new RegExp(`X-Task-Id: ${task.id}`, 'i'));
    assert.match(head, new RegExp(`Location: /v1/tasks/${task.id}`, 'i'));

    const exported = path.join(dir, 'out.raw');
    await curl(['-o', exported, `${srv.url}/export_raw_vdi?session_id=OpaqueRef:abc&vdi=${vdi}&format=raw`]);
    assert.equal(await sha256File(exported), await sha256File(disk));
  });

  test('format defaults to raw; task_id is accepted and the transfer runs as its own diskport task', async () => {
    const vdi = (await createVdi(srv.url, SIZE)).id;
    const task = JSON.parse(
      (
        await curl([
          '-T',
          disk,
          `${srv.url}/import_raw_vdi?session_id=OpaqueRef:abc&task_id=OpaqueRef:t1&vdi=${vdi}`,
        ])
      ).toString(),
    );
    assert.equal(task.status, 'success');
    assert.notEqual(task.id, 'OpaqueRef:t1');
    assert.equal((await api(srv.url, 'GET', `/v1/tasks/${task.id}`)).status, 200);

    const exported = path.join(dir, 'default-format.raw');
    await curl(['-o', exported, `${srv.url}/export_raw_vdi?vdi=${vdi}&task_id=OpaqueRef:t2`]);
    assert.equal(await sha256File(exported), await sha256File(disk));
  });

  test('HEAD gives the size; ranges work as on /v1', async () => {
    const vdi = (await createVdi(srv.url, SIZE)).id;
    await curl(['-T', disk, `${srv.url}/import_raw_vdi?vdi=${vdi}&format=raw`]);
    const head = await fetch(`${srv.url}/export_raw_vdi?vdi=${vdi}&format=raw`, { method: 'HEAD' });
    assert.equal(head.status, 200);
    assert.equal(head.headers.get('content-length'), String(SIZE));
    assert.equal(head.headers.get('accept-ranges'), 'bytes');
    const part = await curl(['-r', `${9 * MiB}-${9 * MiB + 1023}`, `${srv.url}/export_raw_vdi?vdi=${vdi}`]);
    const src = await fsp.readFile(disk);
    assert.ok(part.equals(src.subarray(9 * MiB, 9 * MiB + 1024)));
  });

  test('a missing vdi is 400, an unknown one 404, an unknown format 400', async () => {
    const missing = await api<{ error: { message: string } }>(srv.url, 'GET', '/export_raw_vdi?format=raw');
    assert.equal(missing.status, 400);
    assert.match(missing.body.error.message, /vdi/);
    const unknown = await api<{ error: { code: string } }>(srv.url, 'GET', '/export_raw_vdi?vdi=nope');
    assert.equal(unknown.status, 404);
    assert.equal(unknown.body.error.code, 'VDI_NOT_FOUND');
    const vdi = (await createVdi(srv.url, SIZE)).id;
    const badFormat = await api<{ error: { code: string } }>(
      srv.url,
      'GET',
      `/export_raw_vdi?vdi=${vdi}&format=tar`,
    );
    assert.equal(badFormat.status, 400);
    assert.equal(badFormat.body.error.code, 'FORMAT_NOT_SUPPORTED');
  });

  const vhdSkip = availableFormats().includes('vhd')
    ? false
    : `the vhd codec is not registered yet (available: ${availableFormats().join(', ')})`;
  test('a VHD written by qemu-img imports with format=vhd and exports back as raw and as vhd', {
    skip: vhdSkip,
  }, async () => {
    const vhd = path.join(dir, 'disk.vhd');
    await execFileP('qemu-img', ['convert', '-f', 'raw', '-O', 'vpc', disk, vhd]);
    const vdi = (await createVdi(srv.url, SIZE)).id;
    const task = JSON.parse(
      (
        await curl(['-T', vhd, `${srv.url}/import_raw_vdi?session_id=OpaqueRef:abc&vdi=${vdi}&format=vhd`])
      ).toString(),
    );
    assert.equal(task.status, 'success');

    const raw = path.join(dir, 'from-vhd.raw');
    await curl(['-o', raw, `${srv.url}/export_raw_vdi?session_id=OpaqueRef:abc&vdi=${vdi}&format=raw`]);
    assert.equal(await sha256File(raw), await sha256File(disk));

    const vhdOut = path.join(dir, 'out.vhd');
    await curl(['-o', vhdOut, `${srv.url}/export_raw_vdi?session_id=OpaqueRef:abc&vdi=${vdi}&format=vhd`]);
    const info = JSON.parse(
      (await execFileP('qemu-img', ['info', '--output=json', '-f', 'vpc', vhdOut])).stdout,
    );
    assert.ok(info['virtual-size'] >= SIZE, `qemu-img reads a ${info['virtual-size']}-byte disk`);
    await execFileP('qemu-img', ['compare', '-f', 'vpc', '-F', 'raw', vhdOut, disk]);
  });
});

describe('xapi-compatible endpoints with a token', () => {
  const token = 'xapi-s3cret';
  let srv: TestServer;
  let dir: string;
  let disk: string;
  let vdi: string;
  before(async () => {
    srv = await startServer({ token });
    dir = await tempDir();
    disk = path.join(dir, 'disk.raw');
    await writeImage(disk, 2);
    const created = await api<{ id: string }>(
      srv.url,
      'POST',
      '/v1/vdis',
      { name_label: 'xapi', virtual_size: SIZE },
      { authorization: `Bearer ${token}` },
    );
    vdi = created.body.id;
  });
  after(async () => {
    await srv.close();
    await fsp.rm(dir, { recursive: true, force: true });
  });

  test('session_id=<token> is the credential, as xapi scripts pass it', async () => {
    const task = JSON.parse(
      (
        await curl(['-T', disk, `${srv.url}/import_raw_vdi?session_id=${token}&vdi=${vdi}&format=raw`])
      ).toString(),
    );
    assert.equal(task.status, 'success');
    const out = path.join(dir, 'out.raw');
    await curl(['-o', out, `${srv.url}/export_raw_vdi?session_id=${token}&vdi=${vdi}&format=raw`]);
    assert.equal(await sha256File(out), await sha256File(disk));
  });

  test('Bearer and Basic auth (the token as password, curl -u) work too', async () => {
    const bearer = await curl([
      '-H',
      `Authorization: Bearer ${token}`,
      `${srv.url}/export_raw_vdi?vdi=${vdi}`,
    ]);
    assert.equal(bearer.length, SIZE);
    const basic = await curl(['-u', `root:${token}`, `${srv.url}/export_raw_vdi?vdi=${vdi}`]);
    assert.equal(basic.length, SIZE);
  });

  test('no credential is 401; a wrong session_id, bearer or password is 403; nothing is changed', async () => {
    const none = await api<{ error: { code: string; message: string } }>(
      srv.url,
      'GET',
      `/export_raw_vdi?vdi=${vdi}`,
    );
    assert.equal(none.status, 401);
    assert.equal(none.body.error.code, 'TOKEN_REQUIRED');
    assert.match(none.body.error.message, /session_id/);
    const wrongSession = await api<{ error: { code: string } }>(
      srv.url,
      'GET',
      `/export_raw_vdi?vdi=${vdi}&session_id=OpaqueRef:abc`,
    );
    assert.equal(wrongSession.status, 403);
    assert.equal(wrongSession.body.error.code, 'TOKEN_INVALID');
    const wrongBearer = await api(srv.url, 'GET', `/export_raw_vdi?vdi=${vdi}`, undefined, {
      authorization: 'Bearer nope',
    });
    assert.equal(wrongBearer.status, 403);
    const wrongBasic = await api(srv.url, 'GET', `/export_raw_vdi?vdi=${vdi}`, undefined, {
      authorization: `Basic ${Buffer.from('root:nope').toString('base64')}`,
    });
    assert.equal(wrongBasic.status, 403);

    const other = path.join(dir, 'other.raw');
    await writeImage(other, 3);
    // The refusal comes from the headers alone: send a first piece of the body and wait for it.
    const req = http.request(`${srv.url}/import_raw_vdi?session_id=OpaqueRef:abc&vdi=${vdi}&format=raw`, {
      method: 'PUT',
      headers: { 'content-length': String(SIZE) },
    });
    const refused = new Promise<number>((resolve, reject) => {
      req.on('response', (r) => {
        r.resume();
        resolve(r.statusCode ?? 0);
      });
      req.on('error', reject);
    });
    req.write((await fsp.readFile(other)).subarray(0, 64 * 1024));
    assert.equal(await refused, 403);
    req.destroy();
    const out = path.join(dir, 'after-refusal.raw');
    await curl(['-o', out, `${srv.url}/export_raw_vdi?session_id=${token}&vdi=${vdi}`]);
    assert.equal(await sha256File(out), await sha256File(disk), 'the refused import changed nothing');
  });
});
