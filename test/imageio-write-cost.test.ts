/**
 * An imageio write ticket that changes part of a disk costs what it writes,
 * not the disk (promise 3, issue 12's chains at rest). On an 8 GiB disk with
 * 128 MiB of data and a snapshot, a backup agent's restore of about 1 MiB
 * of changed extents (PUTs of partial clusters over data, data in a hole,
 * the very bytes the disk holds, a PATCH zero over data) commits as a layer
 * of about that size: diskport reads of the disk's content only the parts
 * of the 64 KiB blocks the writes leave to it (in a vhd SR, the rest of the
 * 2 MiB blocks they touch), `diskport_delta_base_bytes_read_total` on
 * /metrics; all the server reads and writes meanwhile, files and sockets,
 * is a few MiB (/proc/self/io), and the changed blocks are the writes' alone. The VDI then reads
 * as the same writes made by qemu-io on a local overlay (qemu-img compare),
 * its layer at rest passes qemu-img check, and the snapshot still reads as
 * the base. A VDI without a snapshot (one flat file) keeps the rest of its
 * content too. Bytes and space, never time.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { api, createVdi, execFileP } from './helpers/api.js';
import { bitsSet } from './helpers/bitmaps.js';
import {
  assertExportReads,
  baseBytesRead as baseBytesReadAt,
  COST_DISK_SIZE,
  ioDuring,
  overlayOf,
  topLayerFile,
  writeCostDisk,
} from './helpers/cost-disk.js';
import { startServer, type TestServer, tempDir } from './helpers/server.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const SIZE = COST_DISK_SIZE;
/** The restore's writes, as an imageio client sends them and as qemu-io writes them. */
const WRITES: { at: number; length: number; byte: number | 'zero' }[] = [
  { at: 1028 * KiB, length: 300 * KiB, byte: 0x5a }, // part of blocks over data
  { at: 2 * GiB, length: 192 * KiB, byte: 'zero' }, // zeros over data
  { at: 3 * GiB, length: 256 * KiB, byte: 0xa5 }, // data in a hole
  { at: 5 * GiB, length: 128 * KiB, byte: 0x33 }, // the very bytes the disk holds there
  { at: 8184 * MiB, length: 64 * KiB, byte: 0x77 }, // data over data near the end
];
/** Changed 64 KiB blocks: 320 KiB + 192 KiB + 256 KiB + 64 KiB; not the identical 128 KiB. */
const CHANGED_BLOCKS = 5 + 3 + 4 + 1;

type Task = { status: string; error: unknown };

describe('imageio write ticket cost', () => {
  let srv: TestServer;
  let work: string;
  let baseQcow2: string;
  let want: string;
  before(async () => {
    work = await tempDir();
    srv = await startServer();
    baseQcow2 = await writeCostDisk(work);
    want = await overlayOf(
      baseQcow2,
      path.join(work, 'want.qcow2'),
      WRITES.map((w) =>
        w.byte === 'zero' ? `write -z ${w.at} ${w.length}` : `write -P ${w.byte} ${w.at} ${w.length}`,
      ),
    );
  });
  after(async () => {
    await srv.close();
    await fsp.rm(srv.dataDir, { recursive: true, force: true });
    await fsp.rm(work, { recursive: true, force: true });
  });

  const baseBytesRead = () => baseBytesReadAt(srv.url);
  const physical = async (id: string) =>
    (await api<{ physical_utilisation: number }>(srv.url, 'GET', `/v1/vdis/${id}`)).body.physical_utilisation;
  /** A VDI of the SR format holding the base disk. */
  const baseVdi = async (sr: string) => {
    const vdi = (await createVdi(srv.url, SIZE, { image_format: sr })).id;
    const res = await fetch(`${srv.url}/v1/vdis/${vdi}/contents?format=qcow2`, {
      method: 'PUT',
      body: new Uint8Array(await fsp.readFile(baseQcow2)),
    });
    assert.equal(res.status, 200, await res.text());
    return vdi;
  };
  /** The restore, as an imageio client makes it: a write ticket, PUTs and a PATCH zero, flush, finalize. */
  const restore = async (vdi: string) => {
    const ticket = randomUUID();
    const installed = await api(srv.url, 'PUT', `/v1/imageio/tickets/${ticket}`, {
      uuid: ticket,
      size: SIZE,
      url: `vdi:${vdi}`,
      ops: ['write'],
      timeout: 300,
      inactivity_timeout: 120,
    });
    assert.equal(installed.status, 200, JSON.stringify(installed.body));
    const url = `${srv.url}/images/${ticket}`;
    for (const w of WRITES) {
      const res =
        w.byte === 'zero'
          ? await fetch(url, {
              method: 'PATCH',
              headers: { 'content-type': 'application/json' },
              body: JSON.stringify({ op: 'zero', offset: w.at, size: w.length, flush: false }),
            })
          : await fetch(`${url}?flush=n`, {
              method: 'PUT',
              headers: { 'content-range': `bytes ${w.at}-${w.at + w.length - 1}/*` },
              body: new Uint8Array(Buffer.alloc(w.length, w.byte)),
            });
      assert.equal(res.status, 200, await res.text());
    }
    const flushed = await fetch(url, {
      method: 'PATCH',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ op: 'flush' }),
    });
    assert.equal(flushed.status, 200);
    const fin = await api<Task>(srv.url, 'POST', `/v1/imageio/tickets/${ticket}/finalize?wait=60`);
    assert.equal(fin.status, 202, JSON.stringify(fin.body));
    assert.equal(fin.body.status, 'success', JSON.stringify(fin.body));
  };
  const assertReads = (vdi: string, file: string) => assertExportReads(srv.url, work, vdi, file);

  for (const sr of ['raw', 'qcow2', 'vhd'] as const) {
    test(`${sr} SR: after a snapshot, a 1 MiB restore through a write ticket on an 8 GiB disk with 128 MiB of data is a layer of about 1 MiB, committed without reading the disk`, async () => {
      const vdi = await baseVdi(sr);
      const snap = (await api<{ id: string }>(srv.url, 'POST', `/v1/vdis/${vdi}/snapshots`, {})).body.id;
      const before = await baseBytesRead();
      const io = await ioDuring(() => restore(vdi));
      const moved = io.read + io.written;
      const read = (await baseBytesRead()) - before;
      // Everything the server read and wrote meanwhile (files, sockets, its
      // database): the restore's 1 MiB, the blocks around it, the digests'
      // pages; not the disk's 128 MiB of data.
      assert.ok(moved <= 32 * MiB, `the restore moved ${moved} bytes through read and write calls`);
      // raw and qcow2: the two 64 KiB blocks the first write covers in part.
      // vhd: the rest of the 2 MiB blocks the writes touch (its layers hold whole blocks).
      const most = sr === 'vhd' ? 4 * 2 * MiB : 2 * 64 * KiB;
      assert.ok(read <= most, `the commit read ${read} bytes of the disk (at most ${most})`);
      await assertReads(vdi, want);
      if (sr === 'qcow2') {
        // The top layer at rest is a qcow2 overlay that reads, through its backing chain, as the disk.
        const top = topLayerFile(srv.dataDir, vdi);
        await execFileP('qemu-img', ['check', '-q', '-f', 'qcow2', top]);
        await execFileP('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', top, want]);
      }
      const bits = await api<{ bitmap: string }>(
        srv.url,
        'GET',
        `/v1/vdis/${vdi}/changed-blocks?base=${snap}`,
      );
      assert.equal(bits.status, 200);
      assert.equal(bitsSet(bits.body.bitmap), CHANGED_BLOCKS);
      const space = sr === 'vhd' ? 4 * 2 * MiB + 256 * KiB : 2 * MiB;
      const used = await physical(vdi);
      assert.ok(used <= space, `the layer takes ${used} bytes (at most ${space})`);
      assert.ok((await physical(snap)) >= 128 * MiB, 'the snapshot keeps the disk');
      await assertReads(snap, baseQcow2);
    });
  }

  test('a VDI without a snapshot (one flat file) keeps what the ticket did not write', async () => {
    const vdi = await baseVdi('raw');
    await restore(vdi);
    await assertReads(vdi, want);
  });
});
