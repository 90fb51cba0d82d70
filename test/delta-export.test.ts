/**
 * The incremental cycle, with qemu-img as judge: a full export of a
 * snapshot, three scattered writes, a second snapshot, then delta exports
 * (`base=`) in vhd and qcow2. The qcow2 delta saved beside the base's export
 * reads as the new disk through its backing file; the vhd delta is a
 * differencing VHD naming the base's VHD as parent, whose blocks laid over
 * the base give the new disk; both are close in size to the change, and keep
 * every export property (Content-Length, ETag, ranges, resume).
 */
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { api, createVdi, curl, execFileP } from './helpers/api.js';
import { seededBytes, startServer, type TestServer, tempDir } from './helpers/server.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 32 * MiB;
type ErrorBody = { error: { code: string; message: string } };
type Snap = { id: string; vhd_uuid?: string };

/** A disk with data in a few places. */
function initial(): Buffer {
  const disk = Buffer.alloc(SIZE);
  seededBytes(4 * MiB, 1).copy(disk, 0);
  seededBytes(2 * MiB, 2).copy(disk, 12 * MiB);
  seededBytes(3 * MiB, 3).copy(disk, 24 * MiB);
  return disk;
}

/** Three scattered writes: new data, zeros over data, data in a hole. */
const WRITES: [at: number, length: number, kind: 'data' | 'zero'][] = [
  [1 * MiB + 4 * KiB, 300 * KiB, 'data'],
  [13 * MiB, 128 * KiB, 'zero'],
  [20 * MiB + 64 * KiB, 192 * KiB, 'data'],
];
const CHANGED_BYTES = WRITES.reduce((n, [, len]) => n + len, 0);

function written(base: Buffer): Buffer {
  const disk = Buffer.from(base);
  for (const [i, [at, len, kind]] of WRITES.entries()) {
    if (kind === 'zero') disk.fill(0, at, at + len);
    else seededBytes(len, 100 + i).copy(disk, at);
  }
  return disk;
}

async function getBytes(url: string, headers: Record<string, string> = {}) {
  const res = await fetch(url, { headers });
  return { status: res.status, headers: res.headers, body: Buffer.from(await res.arrayBuffer()) };
}

describe('delta export', () => {
  let srv: TestServer;
  let work: string;
  before(async () => {
    work = await tempDir();
    srv = await startServer();
  });
  after(async () => {
    await srv.close();
    await fsp.rm(srv.dataDir, { recursive: true, force: true });
    await fsp.rm(work, { recursive: true, force: true });
  });

  const importRaw = async (id: string, body: Buffer) => {
    const res = await fetch(`${srv.url}/v1/vdis/${id}/contents?format=raw`, {
      method: 'PUT',
      body: new Uint8Array(body),
    });
    assert.equal(res.status, 200, await res.text());
  };
  const snapshot = async (id: string) => {
    const res = await api<Snap>(srv.url, 'POST', `/v1/vdis/${id}/snapshots`, {});
    assert.equal(res.status, 201, JSON.stringify(res.body));
    return res.body;
  };
  const save = async (url: string, file: string) => {
    const res = await getBytes(url);
    assert.equal(res.status, 200, res.body.toString());
    assert.equal(Number(res.headers.get('content-length')), res.body.length, 'exact Content-Length');
    await fsp.writeFile(file, res.body);
    return res;
  };

  for (const format of ['qcow2', 'vhd', 'raw'] as const) {
    test(`${format} SR: vhd and qcow2 deltas of three scattered writes rebuild the new disk over the base's export`, async () => {
      const dir = path.join(work, format);
      await fsp.mkdir(dir);
      const vdi = (await createVdi(srv.url, SIZE, { image_format: format })).id;
      const before = initial();
      const after = written(before);
      await importRaw(vdi, before);
      const s1 = await snapshot(vdi);
      assert.equal(s1.vhd_uuid, s1.id, "a snapshot's VHD unique id is reported on it");
      await save(`${srv.url}/v1/vdis/${s1.id}/contents?format=qcow2`, path.join(dir, `${s1.id}.qcow2`));
      await save(`${srv.url}/v1/vdis/${s1.id}/contents?format=vhd`, path.join(dir, `${s1.id}.vhd`));
      await importRaw(vdi, after);
      const s2 = await snapshot(vdi);
      const live = path.join(dir, 'live.raw');
      await fsp.writeFile(live, after);

      // qcow2: an overlay naming the base's export; qemu reads the new disk through it.
      for (const id of [s2.id, vdi]) {
        const file = path.join(dir, `delta-${id}.qcow2`);
        const res = await save(`${srv.url}/v1/vdis/${id}/contents?format=qcow2&base=${s1.id}`, file);
        assert.ok(
          res.body.length < CHANGED_BYTES + 1 * MiB,
          `qcow2 delta of ${res.body.length} bytes for ${CHANGED_BYTES} changed`,
        );
        const info = JSON.parse((await execFileP('qemu-img', ['info', '--output=json', file])).stdout);
        assert.equal(info['backing-filename'], `${s1.id}.qcow2`);
        assert.equal(info['backing-filename-format'], 'qcow2');
        await execFileP('qemu-img', ['check', file]);
        await execFileP('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', file, live]);
      }

      // vhd: a differencing VHD whose parent is the base's VHD export.
      const vhd = path.join(dir, `${s2.id}.vhd`);
      const res = await save(`${srv.url}/v1/vdis/${s2.id}/contents?format=vhd&base=${s1.id}`, vhd);
      // 2 MiB VHD blocks: three writes touch at most four blocks.
      assert.ok(res.body.length < 4 * (2 * MiB + 512) + 64 * KiB, `vhd delta of ${res.body.length} bytes`);
      const bytes = res.body;
      assert.equal(bytes.readUInt32BE(60), 4, 'footer: differencing disk');
      const header = bytes.subarray(512, 1536);
      assert.equal(
        header.subarray(40, 56).toString('hex'),
        s1.id.replaceAll('-', ''),
        "parent UUID: the base's",
      );
      assert.ok(
        bytes.includes(Buffer.from(`.\\${s1.id}.vhd`, 'utf16le')),
        'a parent locator names the base export',
      );
      const baseVhd = await fsp.readFile(path.join(dir, `${s1.id}.vhd`));
      assert.equal(
        baseVhd.subarray(68, 84).toString('hex'),
        s1.id.replaceAll('-', ''),
        'the base export carries that UUID',
      );
      const info = JSON.parse((await execFileP('qemu-img', ['info', '--output=json', vhd])).stdout);
      assert.equal(info.format, 'vpc');
      assert.equal(info['virtual-size'], SIZE);
      const map = JSON.parse(
        (await execFileP('qemu-img', ['map', '--output=json', '-f', 'vpc', vhd])).stdout,
      ) as {
        start: number;
        length: number;
        data: boolean;
      }[];
      const own = path.join(dir, 'own.raw');
      await execFileP('qemu-img', ['convert', '-f', 'vpc', '-O', 'raw', vhd, own]);
      const ownBytes = await fsp.readFile(own);
      const rebuilt = Buffer.from(before);
      let mapped = 0;
      for (const e of map) {
        if (!e.data) continue;
        ownBytes.copy(rebuilt, e.start, e.start, e.start + e.length);
        mapped += e.length;
      }
      assert.ok(mapped > 0 && mapped <= 4 * 2 * MiB, `the delta maps ${mapped} bytes`);
      assert.ok(rebuilt.equals(after), 'the base overlaid with the delta blocks is the new disk');
    });
  }

  test('a delta export keeps every export property: ETag, HEAD, ranges, resume by If-Range; the xapi alias takes base= too', async () => {
    const vdi = (await createVdi(srv.url, SIZE)).id;
    await importRaw(vdi, initial());
    const s1 = await snapshot(vdi);
    await importRaw(vdi, written(initial()));
    for (const format of ['vhd', 'qcow2']) {
      const url = `${srv.url}/v1/vdis/${vdi}/contents?format=${format}&base=${s1.id}`;
      const whole = await getBytes(url);
      assert.equal(whole.status, 200);
      const etag = whole.headers.get('etag') as string;
      assert.match(etag, new RegExp(`base-${s1.id}`));
      const full = await getBytes(`${srv.url}/v1/vdis/${vdi}/contents?format=${format}`);
      assert.notEqual(full.headers.get('etag'), etag, 'the delta is another representation');
      const head = await fetch(url, { method: 'HEAD' });
      assert.equal(Number(head.headers.get('content-length')), whole.body.length);
      assert.equal(head.headers.get('etag'), etag);
      const mid = Math.floor(whole.body.length / 3);
      const part = await getBytes(url, { range: `bytes=${mid}-${mid + 99_999}` });
      assert.equal(part.status, 206);
      assert.ok(part.body.equals(whole.body.subarray(mid, mid + 100_000)));
      const resumed = await getBytes(url, { range: `bytes=${mid}-`, 'if-range': etag });
      assert.equal(resumed.status, 206);
      assert.ok(resumed.body.equals(whole.body.subarray(mid)));
      const notModified = await fetch(url, { headers: { 'if-none-match': etag } });
      assert.equal(notModified.status, 304);
      const xapi = await curl([`${srv.url}/export_raw_vdi?vdi=${vdi}&format=${format}&base=${s1.id}`]);
      assert.ok(xapi.equals(whole.body), `the xapi alias answers the same ${format} delta`);
    }
    // After another import, the same URL is another delta, with another ETag.
    const before = (
      await getBytes(`${srv.url}/v1/vdis/${vdi}/contents?format=qcow2&base=${s1.id}`)
    ).headers.get('etag');
    await importRaw(vdi, initial());
    const now = await getBytes(`${srv.url}/v1/vdis/${vdi}/contents?format=qcow2&base=${s1.id}`);
    assert.notEqual(now.headers.get('etag'), before);
    assert.ok(now.body.length <= 6 * 64 * KiB, 'back to the base content: an empty overlay');
  });

  test('raw has no delta shape (400 naming the dirty extents); a base of another VDI is 409 CHANGED_BLOCKS_UNKNOWN', async () => {
    const a = (await createVdi(srv.url, MiB)).id;
    const b = (await createVdi(srv.url, MiB)).id;
    const sa = await snapshot(a);
    const sb = await snapshot(b);
    const raw = await api<ErrorBody>(srv.url, 'GET', `/v1/vdis/${a}/contents?format=raw&base=${sa.id}`);
    assert.equal(raw.status, 400);
    assert.match(raw.body.error.message, /context=dirty/);
    const other = await api<ErrorBody>(srv.url, 'GET', `/v1/vdis/${a}/contents?format=vhd&base=${sb.id}`);
    assert.equal(other.status, 409);
    assert.equal(other.body.error.code, 'CHANGED_BLOCKS_UNKNOWN');
    const xapi = await api<ErrorBody>(srv.url, 'GET', `/export_raw_vdi?vdi=${a}&format=qcow2&base=${sb.id}`);
    assert.equal(xapi.status, 409);
  });
});
