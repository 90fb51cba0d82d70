/**
 * Images read as qemu reads them, at their edges:
 * - a disk whose size is not a whole number of sectors: qemu-img rounds a
 *   1,000,001-byte disk up to 1,000,448 bytes (the partial sector's bytes
 *   kept, zeros after), and reads a qcow2 header or VHD footer that says
 *   1,000,001 as 999,936 bytes (whole sectors only). Imported into a VDI of
 *   the size qemu reports, and exported raw, each is `qemu-img convert -O raw`
 *   of the source, byte for byte, whatever the VDI's format at rest;
 * - a version 2 qcow2 whose L2 entry has the zero flag (bit 0), which
 *   version 2 does not have: qemu refuses to read it, and so does diskport
 *   (400 MALFORMED_IMAGE), leaving the VDI as it was.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { promises as fsp, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { api, createVdi } from './helpers/api.js';
import { seededBytes, startServer, type TestServer, tempDir } from './helpers/server.js';

const ODD_SIZE_BYTES = 1_000_001;
type ErrorBody = { error: { code: string; message: string } };

function qemuImg(...args: string[]): string {
  return execFileSync('qemu-img', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

function qemuSize(file: string): number {
  return (JSON.parse(qemuImg('info', '--output=json', file)) as { 'virtual-size': number })['virtual-size'];
}

/** The disk as qemu reads it. */
function qemuRaw(dir: string, file: string): Buffer {
  const out = path.join(dir, `${path.basename(file)}.qemu.raw`);
  qemuImg('convert', '-O', 'raw', file, out);
  return readFileSync(out);
}

/** Rewrites a VHD's footer (and its copy at 0) with another current size, checksum recomputed. */
function setVhdCurrentSize(img: Buffer, size: number): void {
  for (const at of [0, img.length - 512]) {
    img.writeBigUInt64BE(BigInt(size), at + 40); // original size
    img.writeBigUInt64BE(BigInt(size), at + 48); // current size
    img.writeUInt32BE(0, at + 64);
    let sum = 0;
    for (let i = at; i < at + 512; i++) sum += img[i];
    img.writeUInt32BE(~sum >>> 0, at + 64);
  }
}

describe('images read as qemu reads them', () => {
  let dir: string;
  let srv: TestServer;

  before(async () => {
    dir = await tempDir('diskport-fidelity-');
    srv = await startServer({ dataDir: path.join(dir, 'data') });
  });
  after(async () => {
    await srv?.close();
    await fsp.rm(dir, { recursive: true, force: true });
  });

  const put = (vdi: string, format: string, body: Buffer) =>
    fetch(`${srv.url}/v1/vdis/${vdi}/contents?format=${format}`, {
      method: 'PUT',
      body: new Uint8Array(body),
    });

  test('a disk of 1,000,001 bytes keeps its last partial sector as qemu reads it, in qcow2 and vhd', async () => {
    const raw = path.join(dir, 'odd.raw');
    writeFileSync(raw, seededBytes(ODD_SIZE_BYTES, 41));
    const sources: { name: string; format: 'qcow2' | 'vhd'; file: string }[] = [];
    const add = (name: string, format: 'qcow2' | 'vhd', make: (file: string) => void) => {
      const file = path.join(dir, `${name}.${format}`);
      make(file);
      sources.push({ name, format, file });
    };
    add('qemu-img qcow2', 'qcow2', (f) => qemuImg('convert', '-f', 'raw', '-O', 'qcow2', raw, f));
    add('qcow2 saying 1000001', 'qcow2', (f) => {
      qemuImg('convert', '-f', 'raw', '-O', 'qcow2', raw, f);
      const img = readFileSync(f);
      img.writeBigUInt64BE(BigInt(ODD_SIZE_BYTES), 24);
      writeFileSync(f, img);
    });
    add('qemu-img vhd (CHS)', 'vhd', (f) => qemuImg('convert', '-f', 'raw', '-O', 'vpc', raw, f));
    add('qemu-img vhd (force_size)', 'vhd', (f) =>
      qemuImg('convert', '-f', 'raw', '-O', 'vpc', '-o', 'force_size=on', raw, f),
    );
    add('vhd saying 1000001', 'vhd', (f) => {
      qemuImg('convert', '-f', 'raw', '-O', 'vpc', '-o', 'force_size=on', raw, f);
      const img = readFileSync(f);
      setVhdCurrentSize(img, ODD_SIZE_BYTES);
      writeFileSync(f, img);
    });

    for (const source of sources) {
      const expected = qemuRaw(dir, source.file);
      const size = qemuSize(source.file);
      assert.equal(expected.length, size);
      assert.equal(size % 512, 0);
      for (const imageFormat of ['raw', 'qcow2', 'vhd']) {
        const what = `${source.name} into a ${imageFormat} VDI`;
        const vdi = await createVdi(srv.url, size, { image_format: imageFormat });
        const res = await put(vdi.id, source.format, readFileSync(source.file));
        assert.equal(res.status, 200, `${what}: ${await res.text()}`);
        const out = await fetch(`${srv.url}/v1/vdis/${vdi.id}/contents?format=raw`);
        assert.equal(out.status, 200, what);
        const got = Buffer.from(await out.arrayBuffer());
        assert.equal(got.length, expected.length, what);
        assert.ok(got.equals(expected), `${what}: the bytes differ from qemu-img convert's`);
      }
    }
  });

  test('a version 2 qcow2 with the zero flag in an L2 entry is refused as qemu refuses it', async () => {
    const raw = path.join(dir, 'v2.raw');
    writeFileSync(raw, seededBytes(256 * 1024, 42));
    const file = path.join(dir, 'v2.qcow2');
    qemuImg('convert', '-f', 'raw', '-O', 'qcow2', '-o', 'compat=0.10', raw, file);
    const img = readFileSync(file);
    const l1 = Number(img.readBigUInt64BE(40));
    const l2 = Number(img.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
    // Guest cluster 1: an allocated cluster with bit 0 set (a "preallocated zero cluster" in version 3).
    img.writeBigUInt64BE(img.readBigUInt64BE(l2 + 8) | 1n, l2 + 8);
    writeFileSync(file, img);
    assert.throws(
      () => qemuImg('convert', '-O', 'raw', file, path.join(dir, 'v2.out')),
      /Zero cluster entry found in pre-v3 image/,
    );

    for (const imageFormat of ['raw', 'qcow2']) {
      const vdi = await createVdi(srv.url, 256 * 1024, { image_format: imageFormat });
      const first = await put(vdi.id, 'raw', seededBytes(256 * 1024, 43));
      assert.equal(first.status, 200);
      const before = await api<{ generation: number }>(srv.url, 'GET', `/v1/vdis/${vdi.id}`);
      const res = await put(vdi.id, 'qcow2', img);
      const body = (await res.json()) as ErrorBody;
      assert.equal(res.status, 400, JSON.stringify(body));
      assert.equal(body.error.code, 'MALFORMED_IMAGE');
      assert.match(body.error.message, /zero flag/);
      const afterwards = await api<{ generation: number }>(srv.url, 'GET', `/v1/vdis/${vdi.id}`);
      assert.equal(afterwards.body.generation, before.body.generation);
      const content = await fetch(`${srv.url}/v1/vdis/${vdi.id}/contents?format=raw`);
      assert.ok(Buffer.from(await content.arrayBuffer()).equals(seededBytes(256 * 1024, 43)));
    }

    // The same entry in a version 3 image is a zero cluster, and both read it so.
    const v3 = path.join(dir, 'v3.qcow2');
    qemuImg('convert', '-f', 'raw', '-O', 'qcow2', raw, v3);
    const img3 = readFileSync(v3);
    const l1v3 = Number(img3.readBigUInt64BE(40));
    const l2v3 = Number(img3.readBigUInt64BE(l1v3) & 0x00fffffffffffe00n);
    img3.writeBigUInt64BE(img3.readBigUInt64BE(l2v3 + 8) | 1n, l2v3 + 8);
    writeFileSync(v3, img3);
    const vdi = await createVdi(srv.url, 256 * 1024);
    assert.equal((await put(vdi.id, 'qcow2', img3)).status, 200);
    const content = await fetch(`${srv.url}/v1/vdis/${vdi.id}/contents?format=raw`);
    assert.ok(Buffer.from(await content.arrayBuffer()).equals(qemuRaw(dir, v3)));
  });
});
