/**
 * A delta import after a snapshot costs O(the delta), not O(the disk): on an
 * 8 GiB disk holding 128 MiB of data, a qcow2 overlay changing about 1 MiB
 * (whole and partial clusters, zeros over data, data in a hole, and a
 * rewrite of bytes the disk already holds) is committed as a layer of about
 * that size, and diskport reads of the disk's content only the parts of the
 * clusters the overlay leaves to it (`diskport_delta_base_bytes_read_total`
 * on /metrics; in a vhd SR, whose layers hold whole 2 MiB blocks, the rest
 * of the blocks the delta touches). The rewritten blocks are neither in the
 * layer nor changed blocks; the VDI and its layer at rest read as the
 * overlay over its base (qemu-img compare, check). A second delta on top
 * (base=current) carries the first one's blocks into its layer, still
 * without reading the disk. The same holds through an upload session with a
 * base and through the xapi alias with a differencing VHD. A whole-image
 * import of the same change reads none of the disk either: the block
 * digests tell which blocks differ. Bytes and space, never time.
 */
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { api, createVdi, execFileP } from './helpers/api.js';
import { bitsSet } from './helpers/bitmaps.js';
import {
  assertExportReads,
  baseBytesRead,
  COST_DISK_SIZE,
  digestFileAllocated,
  ioDuring,
  overlayOf,
  qemuIo,
  topLayerFile,
  writeCostDisk,
} from './helpers/cost-disk.js';
import { startServer, type TestServer, tempDir } from './helpers/server.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const _GiB = 1024 * MiB;
const SIZE = COST_DISK_SIZE;
/** The overlay's writes, in 2 MiB blocks they touch: 1M, 2G, 3G, 5G, 8184M. */
const OVERLAY = [
  'write -P 0x5a 1028k 300k', // part of clusters over data: the rest reads from the disk
  'write -z 2G 192k', // zeros over data
  'write -P 0xa5 3G 256k', // data in a hole
  `write -P ${0x33} 5G 128k`, // the very bytes the disk holds there
  'write -P 0x77 8184M 64k', // data over data near the end
];
/** Changed 64 KiB blocks: 320 KiB + 192 KiB + 256 KiB + 64 KiB; not the identical 128 KiB. */
const CHANGED_BLOCKS = 5 + 3 + 4 + 1;

type Vdi = { id: string; physical_utilisation: number };
type Bitmap = { block_size: number; bitmap: string };
type Task = { status: string; result: Record<string, unknown> | null };

describe('delta import cost', () => {
  let srv: TestServer;
  let work: string;
  let baseQcow2: string;
  let over: string;
  before(async () => {
    work = await tempDir();
    srv = await startServer();
    baseQcow2 = await writeCostDisk(work);
    over = await overlayOf(baseQcow2, path.join(work, 'over.qcow2'), OVERLAY);
  });
  after(async () => {
    await srv.close();
    await fsp.rm(srv.dataDir, { recursive: true, force: true });
    await fsp.rm(work, { recursive: true, force: true });
  });

  /** Bytes of the VDI's content `run` made the service read (the metric's increase). */
  const readDuring = async (run: () => Promise<void>) => {
    const before = await baseBytesRead(srv.url);
    await run();
    return (await baseBytesRead(srv.url)) - before;
  };
  const put = async (pathAndQuery: string, body: Buffer) => {
    const res = await fetch(`${srv.url}${pathAndQuery}`, { method: 'PUT', body: new Uint8Array(body) });
    assert.equal(res.status, 200, await res.text());
  };
  const vdiOf = async (id: string) => (await api<Vdi>(srv.url, 'GET', `/v1/vdis/${id}`)).body;
  /** A VDI of the SR format holding the base disk, and a snapshot of it. */
  const baseVdi = async (sr: string) => {
    const vdi = (await createVdi(srv.url, SIZE, { image_format: sr })).id;
    await put(`/v1/vdis/${vdi}/contents?format=qcow2`, await fsp.readFile(baseQcow2));
    const snap = (await api<{ id: string }>(srv.url, 'POST', `/v1/vdis/${vdi}/snapshots`, {})).body.id;
    return { vdi, snap };
  };
  const _save = async (url: string, file: string) => {
    const res = await fetch(url);
    assert.equal(res.status, 200);
    await fsp.writeFile(file, Buffer.from(await res.arrayBuffer()));
  };
  const assertReads = (vdi: string, file: string) => assertExportReads(srv.url, work, vdi, file);
  /**
   * The VDI's top layer at rest is a valid file of its format: a qcow2 one
   * passes `qemu-img check` and reads, through its backing chain, as `file`;
   * a differencing VHD is one to `qemu-img info` (qemu reads only its own blocks).
   */
  const assertLayerAtRest = async (vdi: string, sr: string, file: string) => {
    const top = topLayerFile(srv.dataDir, vdi);
    if (sr === 'qcow2') {
      await execFileP('qemu-img', ['check', '-q', '-f', 'qcow2', top]);
      await execFileP('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', top, file]);
    } else if (sr === 'vhd') {
      const { stdout } = await execFileP('qemu-img', ['info', '--output=json', '-f', 'vpc', top]);
      assert.equal((JSON.parse(stdout) as { 'virtual-size': number })['virtual-size'] >= SIZE, true);
    }
  };

  for (const sr of ['raw', 'qcow2', 'vhd'] as const) {
    test(`${sr} SR: after a snapshot, a 1 MiB delta on an 8 GiB disk with 128 MiB of data is a layer of about 1 MiB, read without reading the disk`, async () => {
      const dir = path.join(work, sr);
      await fsp.mkdir(dir);
      const { vdi, snap } = await baseVdi(sr);
      const read = await readDuring(() =>
        fsp.readFile(over).then((b) => put(`/v1/vdis/${vdi}/contents?format=qcow2&base=${snap}`, b)),
      );
      // raw and qcow2: only the two clusters the first write covers in part
      // are read through to the disk. vhd: the rest of the 2 MiB blocks the
      // delta touches (its layers hold whole blocks); the identical rewrite's
      // block is compared by digest, not read.
      const most = sr === 'vhd' ? 4 * 2 * MiB : 2 * 64 * KiB;
      assert.ok(read <= most, `the commit read ${read} bytes of the disk (at most ${most})`);
      await assertReads(vdi, over);
      await assertLayerAtRest(vdi, sr, over);

      const bits = await api<Bitmap>(srv.url, 'GET', `/v1/vdis/${vdi}/changed-blocks?base=${snap}`);
      assert.equal(bits.status, 200);
      assert.equal(bitsSet(bits.body.bitmap), CHANGED_BLOCKS);
      const used = (await vdiOf(vdi)).physical_utilisation;
      // vhd layers hold whole 2 MiB blocks (four here); raw and qcow2 the changed clusters.
      const space = sr === 'vhd' ? 4 * 2 * MiB + 256 * KiB : 2 * MiB;
      assert.ok(used <= space, `the layer takes ${used} bytes (at most ${space})`);
      assert.ok((await vdiOf(snap)).physical_utilisation >= 128 * MiB, 'the snapshot keeps the disk');
      // The new digests are the old ones' copy with the delta's entries: as sparse as the disk's data
      // (2 MiB of entries at 8 GiB; the data's take 8 pages), not a whole file per commit.
      const digests = await digestFileAllocated(srv.dataDir, vdi);
      assert.ok(digests <= 128 * KiB, `the commit's digest file takes ${digests} bytes`);

      // A second delta over the first (the VDI's content is now an unshared layer):
      // the new layer carries the first one's blocks, still reading little of the disk.
      const over2 = path.join(dir, 'over2.qcow2');
      await execFileP('qemu-img', ['create', '-f', 'qcow2', '-b', over, '-F', 'qcow2', over2]);
      await qemuIo(over2, ['write -P 0x6b 4G 64k', 'write -P 0x6c 1088k 64k']);
      const read2 = await readDuring(() =>
        fsp.readFile(over2).then((b) => put(`/v1/vdis/${vdi}/contents?format=qcow2&base=current`, b)),
      );
      assert.ok(read2 <= 16 * MiB, `the second commit read ${read2} bytes of the disk`);
      await assertReads(vdi, over2);
      await assertLayerAtRest(vdi, sr, over2);
      const bits2 = await api<Bitmap>(srv.url, 'GET', `/v1/vdis/${vdi}/changed-blocks?base=${snap}`);
      assert.equal(bitsSet(bits2.body.bitmap), CHANGED_BLOCKS + 1);
      const used2 = (await vdiOf(vdi)).physical_utilisation;
      const space2 = sr === 'vhd' ? 5 * 2 * MiB + 256 * KiB : 2 * MiB;
      assert.ok(used2 <= space2, `the carried layer takes ${used2} bytes (at most ${space2})`);
      // The snapshot still reads as the base.
      await assertReads(snap, baseQcow2);
    });
  }

  // One SR: the blocks are told the same way for all three (test/unit/block-diff.test.ts); a qcow2 layer is checked by qemu-img.
  test("qcow2 SR: after a snapshot, a whole-image import that changes 1 MiB of an 8 GiB disk with 128 MiB of data reads none of the VDI's content", async () => {
    const { vdi, snap } = await baseVdi('qcow2');
    // The overlay's disk as one standalone qcow2: what a client that only sends whole images PUTs.
    const whole = path.join(work, 'whole.qcow2');
    await execFileP('qemu-img', ['convert', '-f', 'qcow2', '-O', 'qcow2', over, whole]);
    const body = await fsp.readFile(whole);
    let io = { read: 0, written: 0 };
    const read = await readDuring(async () => {
      io = await ioDuring(() => put(`/v1/vdis/${vdi}/contents?format=qcow2`, body));
    });
    // The block digests tell which blocks differ: the VDI's content is not read (diffing the bytes read its 128 MiB).
    assert.equal(read, 0, `the import read ${read} bytes of the VDI's content`);
    // All the server read meanwhile: the upload from its socket and its staged copies (about 3× the upload
    // here), not the two disks' data once more to compare them (673 MB in all before the digests told).
    const most = 3 * body.length + 64 * MiB;
    assert.ok(
      io.read <= most,
      `the import read ${io.read} bytes (at most ${most}) for a ${body.length}-byte upload`,
    );
    await assertReads(vdi, over);
    await assertLayerAtRest(vdi, 'qcow2', over);
    const bits = await api<Bitmap>(srv.url, 'GET', `/v1/vdis/${vdi}/changed-blocks?base=${snap}`);
    assert.equal(bitsSet(bits.body.bitmap), CHANGED_BLOCKS);
    const used = (await vdiOf(vdi)).physical_utilisation;
    assert.ok(used <= 2 * MiB, `the layer takes ${used} bytes (at most 2 MiB)`);
    await assertReads(snap, baseQcow2);
  });

  test("an upload session with a base (qcow2 SR) and the xapi alias with a differencing VHD (vhd SR) read only the delta's blocks of the disk", async () => {
    // The deltas: diskport's own exports of the overlay's change against the base.
    const { vdi: source, snap: sourceBase } = await baseVdi('raw');
    await put(`/v1/vdis/${source}/contents?format=qcow2&base=${sourceBase}`, await fsp.readFile(over));
    const deltaOf = async (format: string) =>
      Buffer.from(
        await (
          await fetch(`${srv.url}/v1/vdis/${source}/contents?format=${format}&base=${sourceBase}`)
        ).arrayBuffer(),
      );
    const qcow2Delta = await deltaOf('qcow2');
    const vhdDelta = await deltaOf('vhd');
    assert.ok(qcow2Delta.length < 8 * MiB && vhdDelta.length < 16 * MiB, 'the deltas hold the change only');

    const { vdi: viaSession, snap } = await baseVdi('qcow2');
    const read = await readDuring(async () => {
      const opened = await api<{ url: string }>(srv.url, 'POST', '/v1/transfers', {
        vdi: viaSession,
        direction: 'upload',
        format: 'qcow2',
        base: snap,
      });
      assert.equal(opened.status, 201, JSON.stringify(opened.body));
      const chunk = await fetch(opened.body.url, {
        method: 'PUT',
        headers: { 'content-range': `bytes 0-${qcow2Delta.length - 1}/${qcow2Delta.length}` },
        body: new Uint8Array(qcow2Delta),
      });
      assert.equal(chunk.status, 200);
      const fin = await fetch(`${opened.body.url.replace('/data?', '/finalize?')}&wait=60`, {
        method: 'POST',
      });
      const task = (await fin.json()) as Task;
      assert.equal(task.status, 'success', JSON.stringify(task));
    });
    // diskport's deltas hold whole 64 KiB blocks: nothing is read through.
    assert.ok(read <= 2 * 64 * KiB, `the session's commit read ${read} bytes of the disk`);
    await assertReads(viaSession, over);
    await assertLayerAtRest(viaSession, 'qcow2', over);

    const { vdi: viaXapi } = await baseVdi('vhd');
    const readXapi = await readDuring(() => put(`/import_raw_vdi?vdi=${viaXapi}&format=vhd`, vhdDelta));
    assert.ok(readXapi <= 4 * 2 * MiB, `the xapi alias's commit read ${readXapi} bytes of the disk`);
    await assertReads(viaXapi, over);
    await assertLayerAtRest(viaXapi, 'vhd', over);
  });
});
