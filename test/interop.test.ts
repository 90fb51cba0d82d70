/**
 * The interop matrix: images written by qemu-img import, and every export
 * passes qemu-img's judgement against the source.
 */
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { api, createVdi, curl, execFileP } from './helpers/api.js';
import { seededBytes, startServer, type TestServer, tempDir } from './helpers/server.js';

const MiB = 1024 * 1024;
/** Odd on purpose: not a multiple of any cluster or block size, nor a CHS geometry. */
const VIRTUAL_SIZE = 40 * MiB + 7 * 512;

interface Source {
  name: string;
  format: 'raw' | 'vhd' | 'qcow2';
  args: string[];
}

const SOURCES: Source[] = [
  { name: 'raw', format: 'raw', args: [] },
  { name: 'vpc dynamic', format: 'vhd', args: ['-O', 'vpc'] },
  { name: 'vpc fixed', format: 'vhd', args: ['-O', 'vpc', '-o', 'subformat=fixed'] },
  { name: 'qcow2 compat=0.10', format: 'qcow2', args: ['-O', 'qcow2', '-o', 'compat=0.10'] },
  { name: 'qcow2 compat=1.1', format: 'qcow2', args: ['-O', 'qcow2', '-o', 'compat=1.1'] },
  { name: 'qcow2 compressed', format: 'qcow2', args: ['-O', 'qcow2', '-c'] },
  { name: 'qcow2 512 B clusters', format: 'qcow2', args: ['-O', 'qcow2', '-o', 'cluster_size=512'] },
  { name: 'qcow2 2 MiB clusters', format: 'qcow2', args: ['-O', 'qcow2', '-o', 'cluster_size=2097152'] },
];

const QEMU_FORMAT = { raw: 'raw', vhd: 'vpc', qcow2: 'qcow2' } as const;

async function qemuCompare(a: string, aFormat: string, b: string, bFormat: string): Promise<void> {
  await execFileP('qemu-img', ['compare', '-f', aFormat, '-F', bFormat, a, b]);
}

/** qemu-img check; vpc has no checker (exit 63 says so), qcow2 must be clean. */
async function qemuCheck(file: string, format: 'raw' | 'vhd' | 'qcow2'): Promise<void> {
  if (format !== 'qcow2') return;
  await execFileP('qemu-img', ['check', '-f', 'qcow2', file]);
}

describe('interop with qemu-img', () => {
  let srv: TestServer;
  let dir: string;
  let raw: string;
  before(async () => {
    srv = await startServer();
    dir = await tempDir();
    raw = path.join(dir, 'source.raw');
    // Data scattered over the disk, dense in places, with holes between.
    const h = await fsp.open(raw, 'w');
    await h.truncate(VIRTUAL_SIZE);
    for (let i = 0; i < 12; i++) {
      const at = Math.floor((i * VIRTUAL_SIZE) / 12 / 512) * 512 + (i % 3) * 4096;
      const data = seededBytes(i % 4 === 0 ? 3 * MiB : 100 * 1024, 500 + i);
      await h.write(data, 0, Math.min(data.length, VIRTUAL_SIZE - at), at);
    }
    const tail = seededBytes(7 * 512, 999);
    await h.write(tail, 0, tail.length, VIRTUAL_SIZE - tail.length);
    await h.close();
    for (const s of SOURCES) {
      if (s.format === 'raw') continue;
      await execFileP('qemu-img', ['convert', '-f', 'raw', ...s.args, raw, sourceFile(s)]);
    }
  });
  after(async () => {
    await srv.close();
    await fsp.rm(dir, { recursive: true, force: true });
  });

  const sourceFile = (s: Source) =>
    s.format === 'raw' ? raw : path.join(dir, `${s.name.replace(/\W+/g, '-')}.img`);

  async function exportAndJudge(vdiId: string, label: string): Promise<void> {
    for (const format of ['raw', 'vhd', 'qcow2'] as const) {
      const out = path.join(dir, `${label}-export.${format}`);
      await curl(['-o', out, `${srv.url}/v1/vdis/${vdiId}/contents?format=${format}`]);
      await qemuCheck(out, format);
      await qemuCompare(raw, 'raw', out, QEMU_FORMAT[format]);
      const info = JSON.parse(
        (await execFileP('qemu-img', ['info', '--output=json', '-f', QEMU_FORMAT[format], out])).stdout,
      );
      assert.equal(
        info['virtual-size'],
        VIRTUAL_SIZE,
        `${label} exported as ${format} keeps the virtual size`,
      );
      const again = await fetch(`${srv.url}/v1/vdis/${vdiId}/contents?format=${format}`, { method: 'HEAD' });
      assert.equal(
        Number(again.headers.get('content-length')),
        (await fsp.stat(out)).size,
        'Content-Length is exact',
      );
      await fsp.rm(out);
    }
  }

  for (const s of SOURCES) {
    test(`imports ${s.name} into a raw VDI; its raw, vhd and qcow2 exports equal the source`, async () => {
      const vdi = await createVdi(srv.url, VIRTUAL_SIZE);
      const task = JSON.parse(
        (
          await curl(['-T', sourceFile(s), `${srv.url}/v1/vdis/${vdi.id}/contents?format=${s.format}`])
        ).toString(),
      );
      assert.equal(task.status, 'success');
      if (s.format !== 'raw' && !s.args.includes('-c')) {
        // Tables come before the data they map in qemu-img's files: the data goes straight to the disk.
        assert.ok(
          task.result.bytes_streamed > 0.6 * task.result.bytes_received,
          `${task.result.bytes_streamed} of ${task.result.bytes_received} bytes streamed into place`,
        );
      }
      await exportAndJudge(vdi.id, s.name.replace(/\W+/g, '-'));
    });
  }

  for (const atRest of ['vhd', 'qcow2'] as const) {
    for (const s of [SOURCES[0], SOURCES[1], SOURCES[5]]) {
      test(`a VDI stored as ${atRest} takes ${s.name}, stays a valid ${atRest} file, and exports in every format`, async () => {
        const vdi = await createVdi(srv.url, VIRTUAL_SIZE, { image_format: atRest });
        assert.equal((vdi as unknown as { image_format: string }).image_format, atRest);
        const res = await curl([
          '-T',
          sourceFile(s),
          `${srv.url}/v1/vdis/${vdi.id}/contents?format=${s.format}`,
        ]);
        assert.equal(JSON.parse(res.toString()).status, 'success');
        const rec = srv.services.vdis.get(vdi.id);
        const file = srv.services.vdis.imagePath(rec);
        await qemuCheck(file, atRest);
        await qemuCompare(raw, 'raw', file, QEMU_FORMAT[atRest]);
        await exportAndJudge(vdi.id, `${atRest}-${s.name.replace(/\W+/g, '-')}`);
      });
    }
  }

  test('a new VDI stored as qcow2 is a valid empty qcow2 file', async () => {
    const vdi = await createVdi(srv.url, 2 * 1024 * MiB, { image_format: 'qcow2' });
    const file = srv.services.vdis.imagePath(srv.services.vdis.get(vdi.id));
    await qemuCheck(file, 'qcow2');
    const info = JSON.parse((await execFileP('qemu-img', ['info', '--output=json', file])).stdout);
    assert.equal(info.format, 'qcow2');
    assert.equal(info['virtual-size'], 2 * 1024 * MiB);
  });

  test('an image larger than its VDI is refused with 413 naming both sizes; the VDI is unchanged', async () => {
    const vdi = await createVdi(srv.url, 8 * MiB);
    const res = await fetch(`${srv.url}/v1/vdis/${vdi.id}/contents?format=qcow2`, {
      method: 'PUT',
      body: new Uint8Array(await fsp.readFile(sourceFile(SOURCES[4]))),
    });
    assert.equal(res.status, 413);
    const body = (await res.json()) as { error: { code: string; message: string } };
    assert.match(body.error.message, /image virtual size .* exceeds VDI virtual size 8 MiB/);
    const read = await api<{ generation: number }>(srv.url, 'GET', `/v1/vdis/${vdi.id}`);
    assert.equal(read.body.generation, 0);
  });
});
