/**
 * vhd and qcow2 exports sent with sendfile (src/formats/send-spans.ts,
 * src/http/zero-copy.ts, native/sendfile.c), over real sockets: the disk's
 * bytes go from their files, the format's own (headers, tables, VHD
 * bitmaps, footers) between them from the layout's buffers. Every body is
 * compared with the stream path's (DISKPORT_SENDFILE=0, read per response)
 * and judged by qemu-img: whole exports, ranges across format bytes and
 * data, deltas (`base=`), a VDI with a snapshot chain, bodies cut into many
 * native sends; a client that leaves, one that stops reading and a
 * cancelled task stop the send with no wrong byte; a VDI kept as a vhd at
 * rest still streams. `diskport_sendfile_bytes_total` tells which path a
 * body took.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { batchLimits } from '../src/formats/send-spans.js';
import { zeroCopyStats } from '../src/http/zero-copy.js';
import { addon } from '../src/image/native.js';
import { api, createVdi, curl, execFileP } from './helpers/api.js';
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

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = SENDFILE_DISK_SIZE;
const FORMATS = ['vhd', 'qcow2'] as const;
type Format = (typeof FORMATS)[number];
const QEMU_FORMAT: Record<Format, string> = { vhd: 'vpc', qcow2: 'qcow2' };

async function qemuCheck(format: Format, file: string): Promise<void> {
  if (format === 'qcow2') {
    await execFileP('qemu-img', ['check', '-f', 'qcow2', file]);
    return;
  }
  const info = JSON.parse((await execFileP('qemu-img', ['info', '--output=json', file])).stdout);
  assert.equal(info.format, 'vpc');
  assert.equal(info['virtual-size'], SIZE);
}

const sha256 = (buf: Buffer) => createHash('sha256').update(buf).digest('hex');

describe('vhd and qcow2 exports sent with sendfile', () => {
  let srv: TestServer;
  let dir: string;
  let bytes: Buffer;
  let rawFile: string;
  let vdiId: string;
  const url = (id: string, format: string, base?: string) =>
    `${srv.url}/v1/vdis/${id}/contents?format=${format}${base ? `&base=${base}` : ''}`;
  const sentWithSendfile = () => sentBySendfile(srv.url);

  /** The body by the stream path (DISKPORT_SENDFILE=0), none of it by sendfile. */
  async function streamed(u: string, range?: string): Promise<Buffer> {
    const before = await sentWithSendfile();
    process.env.DISKPORT_SENDFILE = '0';
    try {
      return await curl([...(range ? ['-r', range] : []), u]);
    } finally {
      delete process.env.DISKPORT_SENDFILE;
      assert.equal((await sentWithSendfile()) - before, 0, `${u} ${range ?? ''} streamed`);
    }
  }

  /** The body by sendfile (all of it, per the metric), checked equal to the stream path's. */
  async function sentByBoth(u: string, range?: string): Promise<Buffer> {
    const before = await sentWithSendfile();
    const body = await curl([...(range ? ['-r', range] : []), u]);
    assert.equal((await sentWithSendfile()) - before, body.length, `${u} ${range ?? ''} went by sendfile`);
    const reference = await streamed(u, range);
    assert.equal(body.length, reference.length, `${u} ${range ?? ''}: length`);
    assert.ok(body.equals(reference), `${u} ${range ?? ''}: the stream path's bytes`);
    return body;
  }

  /** qemu-img check (qcow2: qemu has no check of VHDs, info reads it) and compare with the raw disk. */
  async function judge(format: Format, body: Buffer, raw: string, name = `judged.${format}`) {
    const file = path.join(dir, name);
    await fsp.writeFile(file, body);
    await qemuCheck(format, file);
    await execFileP('qemu-img', ['compare', '-q', '-f', QEMU_FORMAT[format], '-F', 'raw', file, raw]);
  }

  const upload = async (id: string, data: Buffer, name: string) => {
    const file = path.join(dir, name);
    await fsp.writeFile(file, data);
    await curl(['-T', file, url(id, 'raw')]);
    return file;
  };
  const snapshot = async (id: string) => {
    const res = await api<{ id: string }>(srv.url, 'POST', `/v1/vdis/${id}/snapshots`, {});
    assert.equal(res.status, 201, JSON.stringify(res.body));
    return res.body.id;
  };

  before(async () => {
    assert.equal(
      addon?.sendSpansVersion,
      2,
      'the native addon is older than buffer spans (native/sendfile.c): rebuild it (npm run install)',
    );
    srv = await startServer();
    dir = await tempDir();
    bytes = sendfileDisk(7);
    vdiId = (await createVdi(srv.url, SIZE)).id;
    rawFile = await upload(vdiId, bytes, 'disk.img');
  });
  after(async () => {
    delete process.env.DISKPORT_SENDFILE;
    await srv.close();
    await fsp.rm(dir, { recursive: true, force: true });
  });

  test('whole exports are the stream path bytes, sent by sendfile; qemu-img checks them and finds the disk', async () => {
    for (const format of FORMATS) {
      const body = await sentByBoth(url(vdiId, format));
      await judge(format, body, rawFile);
    }
  });

  test('ranges across headers, tables, bitmaps, data, holes and the footer are the stream path bytes', async () => {
    for (const format of FORMATS) {
      const size = Number(
        (await fetch(url(vdiId, format), { method: 'HEAD' })).headers.get('content-length'),
      );
      const whole = await streamed(url(vdiId, format));
      const ranges: [number, number][] = [
        [100, 3 * MiB + 77], // footer copy or header, tables, the first block's bitmap, data, the next bitmap
        [Math.floor(size / 3) - 5, Math.floor(size / 3) + 5 * MiB + 3], // blocks of data and of holes
        [size - (3 * MiB) / 2, size - 1], // the last data and the footer
      ];
      for (const [start, end] of ranges) {
        const part = await sentByBoth(url(vdiId, format), `${start}-${end}`);
        assert.ok(part.equals(whole.subarray(start, end + 1)), `${format} bytes ${start}-${end}`);
      }
      const suffix = await sentByBoth(url(vdiId, format), `-${2 * MiB + 513}`);
      assert.ok(suffix.equals(whole.subarray(size - 2 * MiB - 513)));
    }
  });

  test('a body cut into many native sends (small batches) is the same; the next request on the connection is served', async () => {
    const saved = { ...batchLimits };
    batchLimits.spans = 3;
    batchLimits.madeBytes = 64 * KiB;
    try {
      for (const format of FORMATS) {
        const sends = zeroCopyStats.sends;
        const a = path.join(dir, `a.${format}`);
        const b = path.join(dir, `b.${format}`);
        const out = await curl([
          '-w',
          '%{num_connects}\\n',
          url(vdiId, format),
          '-o',
          a,
          url(vdiId, format),
          '-o',
          b,
        ]);
        assert.deepEqual(out.toString().trim().split('\n'), ['1', '0'], 'the framing was exact');
        const calls = zeroCopyStats.sends - sends;
        assert.ok(calls >= 10, `${format}: ${calls} native sends for two bodies`);
        const reference = await streamed(url(vdiId, format));
        assert.equal(sha256(await fsp.readFile(a)), sha256(reference));
        assert.equal(sha256(await fsp.readFile(b)), sha256(reference));
      }
    } finally {
      Object.assign(batchLimits, saved);
    }
  });

  test('a VDI with a snapshot chain: whole and ranged exports of the VDI and of its snapshot, each layer from its file', async () => {
    const id = (await createVdi(srv.url, SIZE)).id;
    await upload(id, bytes, 'chain-0.img');
    const s1 = await snapshot(id);
    const next = Buffer.from(bytes);
    seededBytes(3 * MiB, 123).copy(next, 6 * MiB + 4096); // over data and a hole
    next.fill(0, 40 * MiB, 41 * MiB); // zeros over data
    seededBytes(100 * KiB, 124).copy(next, 15 * MiB); // into a hole
    const nextFile = await upload(id, next, 'chain-1.img');
    await snapshot(id);
    seededBytes(64 * KiB, 125).copy(next, 33 * MiB);
    const lastFile = await upload(id, next, 'chain-2.img');
    for (const format of FORMATS) {
      await judge(format, await sentByBoth(url(id, format)), lastFile, `chain.${format}`);
      await judge(format, await sentByBoth(url(s1, format)), rawFile, `snap.${format}`);
      await sentByBoth(url(id, format), `${5 * MiB}-${41 * MiB + 3}`);
    }
    assert.ok(nextFile);
  });

  test('delta exports (base=): the stream path bytes by sendfile; qemu-img reads the new disk through the base', async () => {
    const id = (await createVdi(srv.url, SIZE)).id;
    await upload(id, bytes, 'delta-0.img');
    const s1 = await snapshot(id);
    const deltaDir = path.join(dir, 'delta');
    await fsp.mkdir(deltaDir);
    for (const format of FORMATS) {
      await fsp.writeFile(path.join(deltaDir, `${s1}.${format}`), await sentByBoth(url(s1, format)));
    }
    const next = Buffer.from(bytes);
    seededBytes(300 * KiB, 200).copy(next, MiB + 4096);
    next.fill(0, 13 * MiB, 13 * MiB + 128 * KiB);
    seededBytes(5 * MiB, 201).copy(next, 21 * MiB + 64 * KiB);
    const live = await upload(id, next, 'delta-1.img');
    for (const format of FORMATS) {
      const body = await sentByBoth(url(id, format, s1));
      const mid = Math.floor(body.length / 2);
      const part = await sentByBoth(url(id, format, s1), `${mid}-`);
      assert.ok(part.equals(body.subarray(mid)));
      const file = path.join(deltaDir, `delta.${format}`);
      await fsp.writeFile(file, body);
      await qemuCheck(format, file);
      if (format === 'qcow2') {
        // An overlay naming `${s1}.qcow2`: qemu reads the new disk through it.
        await execFileP('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'raw', file, live]);
        continue;
      }
      // A differencing VHD: its own blocks (qemu-img map) laid over the base are the new disk.
      const map = JSON.parse(
        (await execFileP('qemu-img', ['map', '--output=json', '-f', 'vpc', file])).stdout,
      ) as { start: number; length: number; data: boolean }[];
      const own = path.join(deltaDir, 'own.raw');
      await execFileP('qemu-img', ['convert', '-f', 'vpc', '-O', 'raw', file, own]);
      const ownBytes = await fsp.readFile(own);
      const rebuilt = Buffer.from(bytes);
      for (const e of map) if (e.data) ownBytes.copy(rebuilt, e.start, e.start, e.start + e.length);
      assert.ok(rebuilt.equals(next), 'the base overlaid with the delta blocks is the new disk');
    }
  });

  test('a client that leaves mid-export ends the task; one that stops reading holds the send, then gets every byte', async () => {
    for (const format of FORMATS) {
      const reference = await streamed(url(vdiId, format));
      for (const when of [2 * MiB, Math.floor(reference.length / 3)]) {
        const client = new RawClient(srv.url, `/v1/vdis/${vdiId}/contents?format=${format}`);
        await client.readAtLeast(when);
        client.destroy();
        await client.closed;
        const gone = await lastExportEnded(srv.url);
        assert.equal(
          gone.status,
          'failure',
          `${format} at ${when}: ${JSON.stringify(gone)} ${client.received}`,
        );
        assert.equal(gone.error?.code, 'CLIENT_DISCONNECTED');
      }
      const slow = new RawClient(srv.url, `/v1/vdis/${vdiId}/contents?format=${format}`);
      await slow.readAtLeast(MiB);
      const t = await runningExport(srv.url);
      const stalled = await stalledSend(srv.url, t.id);
      assert.ok(stalled < reference.length - 8 * MiB, `sent ${stalled} to a client that reads nothing`);
      const { head, body } = await slow.response();
      assert.match(head, /^HTTP\/1.1 200/);
      assert.equal(sha256(body), sha256(reference), `${format}: every byte once it read on`);
      assert.equal((await sentByBoth(url(vdiId, format))).length, reference.length);
    }
  });

  test('cancelling the export task cuts the body short, never with a wrong byte', async () => {
    for (const format of FORMATS) {
      const reference = await streamed(url(vdiId, format));
      const client = new RawClient(srv.url, `/v1/vdis/${vdiId}/contents?format=${format}`);
      await client.readAtLeast(MiB);
      const t = await runningExport(srv.url);
      assert.equal((await api(srv.url, 'POST', `/v1/tasks/${t.id}/cancel`)).status, 202);
      const { body } = await client.response();
      assert.ok(body.length < reference.length, 'the body is cut short');
      assert.ok(body.equals(reference.subarray(0, body.length)), 'what arrived is the export');
      const ended = await taskEnded(srv.url, t.id);
      assert.equal(ended.status, 'cancelled');
    }
  });

  test('a VDI kept as a vhd at rest, small ranges and multipart ranges stream as before', async () => {
    const id = (await createVdi(srv.url, SIZE, { image_format: 'vhd' })).id;
    await upload(id, bytes, 'at-rest.img');
    const before = await sentWithSendfile();
    for (const format of FORMATS) {
      const body = await curl([url(id, format)]);
      await judge(format, body, rawFile, `at-rest.${format}`);
      const small = await curl(['-r', '1000-70000', url(vdiId, format)]);
      assert.equal(small.length, 69_001);
      const multi = await fetch(url(vdiId, format), {
        headers: { Range: `bytes=0-1048575,${4 * MiB}-${6 * MiB}` },
      });
      assert.equal(multi.status, 206);
      await multi.arrayBuffer();
    }
    assert.equal((await sentWithSendfile()) - before, 0);
  });
});
