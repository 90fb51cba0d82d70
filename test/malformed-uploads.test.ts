/**
 * Hostile images over HTTP: seeded mutations of small valid VHD and qcow2
 * files. Every upload ends in a 4xx JSON error or a successful import; never
 * a 5xx, a hang or a memory blow-up; a refused one leaves the VDI as it was,
 * and an accepted one holds exactly what the codec reads from the whole file.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { api, createVdi, execFileP, sha256Url } from './helpers/api.js';
import { codecDisk } from './helpers/images.js';
import { rounds } from './helpers/pg.js';
import { prng, seededBytes, startServer, type TestServer, tempDir } from './helpers/server.js';

const MiB = 1024 * 1024;
const CASES_PER_FORMAT = rounds(60, 20);

type Mutation = (img: Buffer, rnd: () => number) => Buffer;

const pick = (rnd: () => number, n: number) => Math.floor(rnd() * n);

/** Damage concentrated where the metadata lives (first and last 64 KiB), sometimes anywhere. */
const MUTATIONS: Mutation[] = [
  (img, rnd) => {
    const out = Buffer.from(img);
    for (let i = 0; i < 1 + pick(rnd, 8); i++)
      out[pick(rnd, Math.min(out.length, 65536))] ^= 1 << pick(rnd, 8);
    return out;
  },
  (img, rnd) => {
    const out = Buffer.from(img);
    const at = out.length - 1 - pick(rnd, Math.min(out.length, 65536));
    out[at] ^= 0xff;
    return out;
  },
  (img, rnd) => img.subarray(0, pick(rnd, img.length)),
  (img, rnd) => {
    // a big-endian 64-bit field somewhere in the header set to something huge
    const out = Buffer.from(img);
    const at = 8 * pick(rnd, 64);
    out.writeBigUInt64BE(
      BigInt.asUintN(64, BigInt(Math.floor(rnd() * 2 ** 52)) << BigInt(pick(rnd, 12))),
      at,
    );
    return out;
  },
  (img, rnd) => {
    // a table entry copied over another: entries pointing at each other
    const out = Buffer.from(img);
    const from = 512 * pick(rnd, Math.min(256, out.length / 512));
    const to = 512 * pick(rnd, Math.min(256, out.length / 512));
    out.copy(out, to, from, from + 512);
    return out;
  },
];

describe('malformed images over HTTP', () => {
  let srv: TestServer;
  let dir: string;
  const sources: Record<string, Buffer> = {};
  before(async () => {
    srv = await startServer();
    dir = await tempDir();
    const raw = path.join(dir, 'base.raw');
    const img = Buffer.alloc(4 * MiB);
    seededBytes(300 * 1024, 1).copy(img, 100 * 1024);
    seededBytes(200 * 1024, 2).copy(img, 3 * MiB);
    await fsp.writeFile(raw, img);
    for (const [name, args] of [
      ['vhd', ['-O', 'vpc']],
      ['qcow2', ['-O', 'qcow2', '-o', 'cluster_size=4096']],
      ['qcow2c', ['-O', 'qcow2', '-c']],
    ] as const) {
      await execFileP('qemu-img', ['convert', '-f', 'raw', ...args, raw, path.join(dir, name)]);
      sources[name] = await fsp.readFile(path.join(dir, name));
    }
  });
  after(async () => {
    await srv.close();
    await fsp.rm(dir, { recursive: true, force: true });
  });

  for (const name of ['vhd', 'qcow2', 'qcow2c']) {
    test(`${CASES_PER_FORMAT} mutated ${name} images: 4xx or success, VDI unchanged on error`, async () => {
      const format = name.startsWith('qcow2') ? 'qcow2' : 'vhd';
      const vdi = await createVdi(srv.url, 8 * MiB);
      const contents = `${srv.url}/v1/vdis/${vdi.id}/contents`;
      const prior = seededBytes(8 * MiB, 77);
      assert.equal((await fetch(contents, { method: 'PUT', body: new Uint8Array(prior) })).status, 200);
      let expected = createHash('sha256').update(prior).digest('hex');
      const rnd = prng(name.length * 1009);
      const outcomes = { refused: 0, imported: 0 };
      for (let i = 0; i < CASES_PER_FORMAT; i++) {
        const mutated = MUTATIONS[i % MUTATIONS.length](sources[name], rnd);
        const before = (await api<{ generation: number }>(srv.url, 'GET', `/v1/vdis/${vdi.id}`)).body
          .generation;
        const res = await fetch(`${contents}?format=${format}`, {
          method: 'PUT',
          body: new Uint8Array(mutated),
          signal: AbortSignal.timeout(20000),
        });
        const body = (await res.json()) as { error?: { code: string; message: string } };
        assert.ok(res.status < 500, `case ${i}: ${res.status} ${JSON.stringify(body)}`);
        const after = (await api<{ generation: number }>(srv.url, 'GET', `/v1/vdis/${vdi.id}`)).body
          .generation;
        if (res.status === 200) {
          outcomes.imported++;
          assert.equal(after, before + 1);
          expected = await sha256Url(contents);
          // Data streamed into place while the upload arrived, the rest converted
          // at the end: together exactly what the codec reads from the whole file.
          const file = path.join(dir, 'mutated');
          await fsp.writeFile(file, mutated);
          assert.equal(
            expected,
            createHash('sha256')
              .update(await codecDisk(file, format, 8 * MiB))
              .digest('hex'),
            `case ${i}: the VDI holds the image`,
          );
        } else {
          outcomes.refused++;
          assert.ok(res.status >= 400 && res.status < 500);
          assert.match(body.error?.code ?? '', /^[A-Z_]+$/);
          assert.ok((body.error?.message ?? '').length > 10, 'the message says what was wrong');
          assert.equal(after, before, `case ${i}: a refused image does not touch the VDI`);
          if (i % 10 === 0)
            assert.equal(await sha256Url(contents), expected, `case ${i}: VDI bytes unchanged`);
        }
      }
      assert.ok(outcomes.refused > CASES_PER_FORMAT / 10, JSON.stringify(outcomes));
      assert.deepEqual(await fsp.readdir(path.join(srv.dataDir, 'srs', 'local', '.staging')), []);
      assert.ok(process.memoryUsage().rss < 800 * MiB, `rss ${process.memoryUsage().rss}`);
    });
  }
});

describe('well-formed images that use what diskport cannot honour, over HTTP', () => {
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

  test('a qcow2 overlay on a backing file is 422 UNSUPPORTED_IMAGE naming it; the VDI is unchanged', async () => {
    const base = path.join(dir, 'base.qcow2');
    const overlay = path.join(dir, 'overlay.qcow2');
    await execFileP('qemu-img', ['create', '-f', 'qcow2', base, '4M']);
    await execFileP('qemu-img', ['create', '-f', 'qcow2', '-b', base, '-F', 'qcow2', overlay]);
    const vdi = await createVdi(srv.url, 4 * MiB);
    const contents = `${srv.url}/v1/vdis/${vdi.id}/contents`;
    const prior = seededBytes(4 * MiB, 5);
    assert.equal((await fetch(contents, { method: 'PUT', body: new Uint8Array(prior) })).status, 200);
    const generation = async () =>
      (await api<{ generation: number }>(srv.url, 'GET', `/v1/vdis/${vdi.id}`)).body.generation;
    const before = await generation();

    const res = await fetch(`${contents}?format=qcow2`, {
      method: 'PUT',
      body: new Uint8Array(await fsp.readFile(overlay)),
    });
    const body = (await res.json()) as { error: { code: string; message: string } };
    assert.equal(res.status, 422, JSON.stringify(body));
    assert.equal(body.error.code, 'UNSUPPORTED_IMAGE');
    assert.match(body.error.message, /backing file/);
    assert.equal(await generation(), before);
    assert.equal(await sha256Url(contents), createHash('sha256').update(prior).digest('hex'));
    assert.deepEqual(await fsp.readdir(path.join(srv.dataDir, 'srs', 'local', '.staging')), []);
  });
});
