/**
 * SRs beside the built-in `local` one: configured with `--sr NAME=PATH:formats`,
 * each with its own directory and formats; listed by GET /v1/srs; a VDI
 * created in one lands in its directory, in a format it takes, and any other
 * format is refused before a file is made.
 */
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { parseConfig } from '../src/config.js';
import { api, createVdi, execFileP, sha256Url } from './helpers/api.js';
import { seededBytes, spawnServer, startServer, type TestServer, tempDir } from './helpers/server.js';

const MiB = 1024 * 1024;

type SrJson = { id: string; supported_image_formats: string[]; default_image_format: string };
type ErrorBody = { error: { code: string; message: string; details: Record<string, unknown> } };

describe('configured SRs', () => {
  let srv: TestServer;
  let fastDir: string;
  let bulkDir: string;

  before(async () => {
    const root = await tempDir();
    fastDir = path.join(root, 'fast');
    bulkDir = path.join(root, 'bulk:archive'); // a colon in the path stays in the path
    const config = parseConfig(['--sr', `fast=${fastDir}:qcow2,raw`, '--sr', `bulk=${bulkDir}:vhd`], {});
    srv = await startServer({ config: { srs: config.srs } });
  });
  after(() => srv.close());

  test('GET /v1/srs lists each SR with its formats, the first listed its default', async () => {
    const res = await api<SrJson[]>(srv.url, 'GET', '/v1/srs');
    assert.equal(res.status, 200);
    const byId = new Map(res.body.map((sr) => [sr.id, sr]));
    assert.deepEqual([...byId.keys()].sort(), ['bulk', 'fast', 'local']);
    assert.deepEqual(byId.get('fast')?.supported_image_formats, ['qcow2', 'raw']);
    assert.equal(byId.get('fast')?.default_image_format, 'qcow2');
    assert.deepEqual(byId.get('bulk')?.supported_image_formats, ['vhd']);
    assert.equal(byId.get('local')?.supported_image_formats.length, 3);
    const one = await api<SrJson>(srv.url, 'GET', '/v1/srs/bulk');
    assert.equal(one.body.default_image_format, 'vhd');
  });

  test('a VDI created in an SR lands in its directory, in its default format, and holds what is imported', async () => {
    const vdi = await createVdi(srv.url, 4 * MiB, { sr: 'fast' });
    const json = await api<{ sr: string; image_format: string }>(srv.url, 'GET', `/v1/vdis/${vdi.id}`);
    assert.equal(json.body.sr, 'fast');
    assert.equal(json.body.image_format, 'qcow2');
    const data = seededBytes(MiB, 7);
    const put = await fetch(`${srv.url}/v1/vdis/${vdi.id}/contents?format=raw`, {
      method: 'PUT',
      body: new Uint8Array(data),
    });
    assert.equal(put.status, 200);
    const files = (await fsp.readdir(fastDir)).filter((f) => f.startsWith(vdi.id) && f.endsWith('.qcow2'));
    assert.equal(files.length, 1);
    const { stdout } = await execFileP('qemu-img', ['check', path.join(fastDir, files[0])]);
    assert.match(stdout, /No errors/);
    const whole = Buffer.alloc(4 * MiB);
    data.copy(whole);
    const { createHash } = await import('node:crypto');
    assert.equal(
      await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents?format=raw`),
      createHash('sha256').update(whole).digest('hex'),
    );
  });

  test('a format the SR does not take is 400 FORMAT_NOT_SUPPORTED naming its formats, and leaves no file', async () => {
    const before = await fsp.readdir(bulkDir);
    for (const image_format of ['raw', 'qcow2']) {
      const res = await api<ErrorBody>(srv.url, 'POST', '/v1/vdis', {
        name_label: 'x',
        virtual_size: MiB,
        sr: 'bulk',
        image_format,
      });
      assert.equal(res.status, 400);
      assert.equal(res.body.error.code, 'FORMAT_NOT_SUPPORTED');
      assert.deepEqual(res.body.error.details.supported_image_formats, ['vhd']);
      assert.match(res.body.error.message, /SR 'bulk'.*vhd/);
    }
    assert.deepEqual(await fsp.readdir(bulkDir), before);
    const vhd = await createVdi(srv.url, MiB, { sr: 'bulk' });
    assert.equal(
      (await api<{ image_format: string }>(srv.url, 'GET', `/v1/vdis/${vhd.id}`)).body.image_format,
      'vhd',
    );
  });

  test('an SR that is not configured is 404 SR_NOT_FOUND', async () => {
    const res = await api<ErrorBody>(srv.url, 'POST', '/v1/vdis', {
      name_label: 'x',
      virtual_size: MiB,
      sr: 'nope',
    });
    assert.equal(res.status, 404);
    assert.equal(res.body.error.code, 'SR_NOT_FOUND');
  });
});

describe('--sr on the command line', () => {
  test('bad specs are refused with a reason', () => {
    for (const [spec, reason] of [
      ['fast', /NAME=PATH/],
      ['local=/tmp/x', /not 'local'/],
      ['a b=/tmp/x', /letters, digits/],
      ['fast=/tmp/x:raw,vmdk', /unknown image format.*vmdk/],
    ] as const) {
      assert.throws(() => parseConfig(['--sr', spec], {}), reason, spec);
    }
    assert.throws(() => parseConfig(['--sr', 'a=/tmp/x', '--sr', 'a=/tmp/y'], {}), /given twice/);
  });

  test('DISKPORT_SRS gives the list when no --sr flag does; a flag replaces it', () => {
    const env = { DISKPORT_SRS: 'a=/tmp/a:raw; b=/tmp/b' };
    assert.deepEqual(
      parseConfig([], env).srs.map((s) => [s.id, s.path, s.formats.join(',')]),
      [
        ['a', '/tmp/a', 'raw'],
        ['b', '/tmp/b', 'raw,vhd,qcow2'],
      ],
    );
    assert.deepEqual(
      parseConfig(['--sr', 'c=/tmp/c:vhd'], env).srs.map((s) => s.id),
      ['c'],
    );
  });

  test('a real process opens its SRs at start, keeps them over a restart, and refuses to drop one holding VDIs', async () => {
    const dataDir = await tempDir();
    const srDir = path.join(await tempDir(), 'second');
    let proc = await spawnServer(dataDir, ['--sr', `second=${srDir}:raw`]);
    let vdiId: string;
    try {
      vdiId = (await createVdi(proc.url, MiB, { sr: 'second' })).id;
      assert.ok((await fsp.readdir(srDir)).some((f) => f.startsWith(vdiId)));
    } finally {
      await proc.stop();
    }
    proc = await spawnServer(dataDir, ['--sr', `second=${srDir}:raw`]);
    try {
      const res = await api<{ sr: string }>(proc.url, 'GET', `/v1/vdis/${vdiId}`);
      assert.equal(res.body.sr, 'second');
    } finally {
      await proc.stop();
    }
    await assert.rejects(spawnServer(dataDir), /SR 'second' holds 1 VDI\(s\) but is not configured/);
    await assert.rejects(
      spawnServer(dataDir, ['--sr', `second=${srDir}:raw`, '--sr', `twin=${srDir}:raw`]),
      /shares its directory/,
    );
  });
});
