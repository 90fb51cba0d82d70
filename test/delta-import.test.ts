/**
 * Delta imports, with qemu-img as judge: qcow2 overlays written by qemu-io
 * (plain and with extended L2, whose unallocated subclusters read from the
 * backing file) and diskport's own delta exports, re-imported with `base=`
 * onto a copy of the base, give the disk the delta describes: `qemu-img
 * compare` of the export with the source passes. A VDI that changed since
 * its base is 409 BASE_MISMATCH (`base=current` skips the check), a
 * malformed delta leaves the VDI as it was, the xapi alias lays a
 * differencing VHD onto the VDI, and upload sessions and tus take a base.
 */
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { api, createVdi, execFileP, sha256File, sha256Url } from './helpers/api.js';
import { seededBytes, startServer, type TestServer, tempDir } from './helpers/server.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 32 * MiB;
type ErrorBody = { error: { code: string; message: string; details?: Record<string, unknown> } };
type Vdi = { id: string; generation: number; physical_utilisation: number };
type Task = { id: string; status: string; result: Record<string, unknown> | null };

/** A disk with data in a few places. */
function initial(): Buffer {
  const disk = Buffer.alloc(SIZE);
  seededBytes(4 * MiB, 1).copy(disk, 0);
  seededBytes(2 * MiB, 2).copy(disk, 12 * MiB);
  seededBytes(3 * MiB, 3).copy(disk, 24 * MiB);
  return disk;
}

/** Three scattered writes: new data, zeros over data, data in a hole. */
function written(base: Buffer): Buffer {
  const disk = Buffer.from(base);
  seededBytes(300 * KiB, 100).copy(disk, 1 * MiB + 4 * KiB);
  disk.fill(0, 13 * MiB, 13 * MiB + 128 * KiB);
  seededBytes(192 * KiB, 102).copy(disk, 20 * MiB + 64 * KiB);
  return disk;
}

async function qemuIo(file: string, format: string, commands: string[]): Promise<void> {
  await execFileP('qemu-io', ['-f', format, ...commands.flatMap((c) => ['-c', c]), file]);
}

describe('delta import', () => {
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

  const put = async (pathAndQuery: string, body: Buffer) => {
    const res = await fetch(`${srv.url}${pathAndQuery}`, { method: 'PUT', body: new Uint8Array(body) });
    const text = await res.text();
    return { status: res.status, body: JSON.parse(text) as Task & ErrorBody };
  };
  const importFile = async (vdi: string, format: string, file: string, query = '') => {
    const res = await put(`/v1/vdis/${vdi}/contents?format=${format}${query}`, await fsp.readFile(file));
    assert.equal(res.status, 200, JSON.stringify(res.body));
    return res.body;
  };
  const snapshot = async (id: string) => {
    const res = await api<{ id: string }>(srv.url, 'POST', `/v1/vdis/${id}/snapshots`, {});
    assert.equal(res.status, 201, JSON.stringify(res.body));
    return res.body.id;
  };
  const vdiOf = async (id: string) => (await api<Vdi>(srv.url, 'GET', `/v1/vdis/${id}`)).body;
  const save = async (url: string, file: string) => {
    const res = await fetch(url);
    assert.equal(res.status, 200);
    await fsp.writeFile(file, Buffer.from(await res.arrayBuffer()));
  };
  /** The VDI's raw export equals `file` (read as `format`), with qemu-img as judge. */
  const assertDisk = async (vdi: string, file: string, format: string) => {
    const out = path.join(work, `check-${vdi}.raw`);
    await save(`${srv.url}/v1/vdis/${vdi}/contents?format=raw`, out);
    await execFileP('qemu-img', ['compare', '-f', format, '-F', 'raw', file, out]);
    await fsp.rm(out);
  };

  for (const sr of ['raw', 'qcow2', 'vhd'] as const) {
    test(`${sr} SR: qcow2 overlays written by qemu-io (plain and extended L2) apply onto a copy of their backing file`, async () => {
      const dir = path.join(work, `qemu-${sr}`);
      await fsp.mkdir(dir);
      const baseRaw = path.join(dir, 'base.raw');
      await fsp.writeFile(baseRaw, initial());
      const base = path.join(dir, 'base.qcow2');
      await execFileP('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', baseRaw, base]);
      for (const extended of [false, true]) {
        const vdi = (await createVdi(srv.url, SIZE, { image_format: sr })).id;
        await importFile(vdi, 'qcow2', base);
        const snap = await snapshot(vdi);
        const over = path.join(dir, `over-${extended}.qcow2`);
        await execFileP('qemu-img', [
          'create',
          '-f',
          'qcow2',
          '-b',
          'base.qcow2',
          '-F',
          'qcow2',
          ...(extended ? ['-o', 'extended_l2=on'] : []),
          over,
        ]);
        // Data over data (part of a cluster: the rest reads from the base), zeros over
        // data, data in a hole, a discard-free zero write in a hole.
        await qemuIo(over, 'qcow2', [
          'write -P 0x5a 1028k 300k',
          'write -z 12M 192k',
          'write -P 0xa5 20548k 8k',
          'write -z 30M 64k',
        ]);
        const task = await importFile(vdi, 'qcow2', over, `&base=${snap}`);
        assert.equal(task.result?.base, snap);
        await assertDisk(vdi, over, 'qcow2');
        const unchanged = path.join(dir, 'snap.raw');
        await save(`${srv.url}/v1/vdis/${snap}/contents?format=raw`, unchanged);
        assert.equal(await sha256File(unchanged), await sha256File(baseRaw), 'the snapshot keeps the base');
        if (sr === 'raw') {
          // The layer over the snapshot holds the changed blocks only.
          const used = (await vdiOf(vdi)).physical_utilisation;
          assert.ok(used < 2 * MiB, `the layer takes ${used} bytes for about 500 KiB changed`);
        }
      }
    });
  }

  test("diskport's own vhd and qcow2 delta exports, imported onto a copy of the base, give the live disk", async () => {
    const dir = path.join(work, 'own');
    await fsp.mkdir(dir);
    const source = (await createVdi(srv.url, SIZE)).id;
    await put(`/v1/vdis/${source}/contents?format=raw`, initial());
    const s1 = await snapshot(source);
    const full = path.join(dir, 'full.qcow2');
    await save(`${srv.url}/v1/vdis/${s1}/contents?format=qcow2`, full);
    await put(`/v1/vdis/${source}/contents?format=raw`, written(initial()));
    const live = path.join(dir, 'live.raw');
    await save(`${srv.url}/v1/vdis/${source}/contents?format=raw`, live);
    for (const format of ['vhd', 'qcow2']) {
      for (const sr of ['raw', 'qcow2']) {
        const copy = (await createVdi(srv.url, SIZE, { image_format: sr })).id;
        await importFile(copy, 'qcow2', full);
        const base = await snapshot(copy);
        const delta = path.join(dir, `delta.${format}`);
        await save(`${srv.url}/v1/vdis/${source}/contents?format=${format}&base=${s1}`, delta);
        const size = (await fsp.stat(delta)).size;
        assert.ok(size < 5 * 2 * MiB, `a ${format} delta of ${size} bytes`);
        await importFile(copy, format, delta, `&base=${base}`);
        await assertDisk(copy, live, 'raw');
        assert.equal(
          await sha256Url(`${srv.url}/v1/vdis/${copy}/contents?format=raw`),
          await sha256File(live),
        );
      }
    }
  });

  test('a VDI changed since its base is 409 BASE_MISMATCH naming both, before a byte is read; base=current skips the check', async () => {
    const dir = path.join(work, 'mismatch');
    await fsp.mkdir(dir);
    const source = (await createVdi(srv.url, SIZE)).id;
    await put(`/v1/vdis/${source}/contents?format=raw`, initial());
    const s1 = await snapshot(source);
    await put(`/v1/vdis/${source}/contents?format=raw`, written(initial()));
    const delta = path.join(dir, 'delta.qcow2');
    await save(`${srv.url}/v1/vdis/${source}/contents?format=qcow2&base=${s1}`, delta);

    const target = (await createVdi(srv.url, SIZE)).id;
    await put(`/v1/vdis/${target}/contents?format=raw`, initial());
    const base = await snapshot(target);
    // Rewriting identical bytes changes nothing: the base still holds.
    await put(`/v1/vdis/${target}/contents?format=raw`, initial());
    const same = await fetch(`${srv.url}/v1/transfers`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ vdi: target, direction: 'upload', format: 'qcow2', base }),
    });
    assert.equal(same.status, 201);
    const opened = (await same.json()) as { id: string };
    assert.equal((await api(srv.url, 'DELETE', `/v1/transfers/${opened.id}`)).status, 200);

    const changed = Buffer.from(initial());
    changed.fill(7, 5 * MiB, 5 * MiB + 4096);
    await put(`/v1/vdis/${target}/contents?format=raw`, changed);
    const before = await vdiOf(target);
    const refused = await put(
      `/v1/vdis/${target}/contents?format=qcow2&base=${base}`,
      await fsp.readFile(delta),
    );
    assert.equal(refused.status, 409);
    assert.equal(refused.body.error.code, 'BASE_MISMATCH');
    assert.equal(refused.body.error.details?.vdi, target);
    assert.equal(refused.body.error.details?.base, base);
    assert.match(refused.body.error.message, new RegExp(`${target}.*${base}`));
    const session = await api<ErrorBody>(srv.url, 'POST', '/v1/transfers', {
      vdi: target,
      direction: 'upload',
      format: 'vhd',
      base,
    });
    assert.equal(session.status, 409);
    assert.equal(session.body.error.code, 'BASE_MISMATCH');
    assert.equal((await vdiOf(target)).generation, before.generation, 'the VDI is as it was');

    // base=current lays the delta onto what the VDI holds now.
    await importFile(target, 'qcow2', delta, '&base=current');
    const expected = written(initial());
    changed.copy(expected, 5 * MiB, 5 * MiB, 5 * MiB + 4096);
    const want = path.join(dir, 'want.raw');
    await fsp.writeFile(want, expected);
    await assertDisk(target, want, 'raw');

    // Bad bases: raw, a VDI that is no snapshot, an unknown one.
    const raw = await put(`/v1/vdis/${target}/contents?format=raw&base=${base}`, Buffer.alloc(512));
    assert.equal(raw.status, 400);
    const notSnap = await put(`/v1/vdis/${target}/contents?format=qcow2&base=${source}`, Buffer.alloc(512));
    assert.equal(notSnap.status, 400);
    const unknown = await put(
      `/v1/vdis/${target}/contents?format=qcow2&base=00000000-0000-0000-0000-000000000000`,
      Buffer.alloc(512),
    );
    assert.equal(unknown.status, 404);
  });

  test('without base a differencing image is still 422; a malformed delta (422 and 400) leaves the VDI as it was', async () => {
    const dir = path.join(work, 'bad');
    await fsp.mkdir(dir);
    const source = (await createVdi(srv.url, SIZE)).id;
    await put(`/v1/vdis/${source}/contents?format=raw`, initial());
    const s1 = await snapshot(source);
    await put(`/v1/vdis/${source}/contents?format=raw`, written(initial()));
    const target = (await createVdi(srv.url, SIZE)).id;
    await put(`/v1/vdis/${target}/contents?format=raw`, initial());
    const base = await snapshot(target);
    const before = await vdiOf(target);
    const sum = await sha256Url(`${srv.url}/v1/vdis/${target}/contents?format=raw`);
    for (const format of ['qcow2', 'vhd']) {
      const delta = path.join(dir, `delta.${format}`);
      await save(`${srv.url}/v1/vdis/${source}/contents?format=${format}&base=${s1}`, delta);
      const bytes = await fsp.readFile(delta);
      const plain = await put(`/v1/vdis/${target}/contents?format=${format}`, bytes);
      assert.equal(plain.status, 422, JSON.stringify(plain.body));
      // Cut short: the last data block (and the vhd footer) is missing.
      const cut = await put(
        `/v1/vdis/${target}/contents?format=${format}&base=${base}`,
        bytes.subarray(0, bytes.length - 70 * KiB),
      );
      assert.equal(cut.status, 400, JSON.stringify(cut.body));
      assert.equal(cut.body.error.code, 'MALFORMED_IMAGE');
    }
    assert.equal((await vdiOf(target)).generation, before.generation);
    assert.equal(await sha256Url(`${srv.url}/v1/vdis/${target}/contents?format=raw`), sum);
  });

  test('the xapi alias lays a differencing VHD onto the VDI; a session and tus take a base', async () => {
    const dir = path.join(work, 'paths');
    await fsp.mkdir(dir);
    const source = (await createVdi(srv.url, SIZE)).id;
    await put(`/v1/vdis/${source}/contents?format=raw`, initial());
    const s1 = await snapshot(source);
    await put(`/v1/vdis/${source}/contents?format=raw`, written(initial()));
    const live = path.join(dir, 'live.raw');
    await save(`${srv.url}/v1/vdis/${source}/contents?format=raw`, live);
    const vhd = await (
      await fetch(`${srv.url}/v1/vdis/${source}/contents?format=vhd&base=${s1}`)
    ).arrayBuffer();
    const qcow2 = await (
      await fetch(`${srv.url}/v1/vdis/${source}/contents?format=qcow2&base=${s1}`)
    ).arrayBuffer();

    const xapi = (await createVdi(srv.url, SIZE)).id;
    await put(`/v1/vdis/${xapi}/contents?format=raw`, initial());
    const res = await put(`/import_raw_vdi?vdi=${xapi}&format=vhd`, Buffer.from(vhd));
    assert.equal(res.status, 200, JSON.stringify(res.body));
    await assertDisk(xapi, live, 'raw');

    // A session: chunks in any order, then finalize.
    const viaSession = (await createVdi(srv.url, SIZE)).id;
    await put(`/v1/vdis/${viaSession}/contents?format=raw`, initial());
    const base = await snapshot(viaSession);
    const opened = await api<{ id: string; url: string; base: string | null }>(
      srv.url,
      'POST',
      '/v1/transfers',
      {
        vdi: viaSession,
        direction: 'upload',
        format: 'qcow2',
        base,
      },
    );
    assert.equal(opened.status, 201);
    assert.equal(opened.body.base, base);
    const bytes = Buffer.from(qcow2);
    const half = Math.floor(bytes.length / 2);
    for (const [s, e] of [
      [half, bytes.length],
      [0, half],
    ]) {
      const chunk = await fetch(opened.body.url, {
        method: 'PUT',
        headers: { 'content-range': `bytes ${s}-${e - 1}/${bytes.length}` },
        body: new Uint8Array(bytes.subarray(s, e)),
      });
      assert.equal(chunk.status, 200);
    }
    const fin = await fetch(`${opened.body.url.replace('/data?', '/finalize?')}&wait=60`, { method: 'POST' });
    const finished = (await fin.json()) as Task;
    assert.equal(finished.status, 'success', JSON.stringify(finished));
    await assertDisk(viaSession, live, 'raw');

    // tus: Upload-Metadata base.
    const viaTus = (await createVdi(srv.url, SIZE)).id;
    await put(`/v1/vdis/${viaTus}/contents?format=raw`, initial());
    const tusBase = await snapshot(viaTus);
    const b64 = (v: string) => Buffer.from(v).toString('base64');
    const created = await fetch(`${srv.url}/v1/tus/`, {
      method: 'POST',
      headers: {
        'tus-resumable': '1.0.0',
        'upload-length': String(vhd.byteLength),
        'upload-metadata': `vdi ${b64(viaTus)},format ${b64('vhd')},base ${b64(tusBase)}`,
        'content-type': 'application/offset+octet-stream',
      },
      body: new Uint8Array(vhd),
    });
    assert.equal(created.status, 201, await created.text());
    await assertDisk(viaTus, live, 'raw');
  });
});
