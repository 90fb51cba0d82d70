/**
 * Snapshots and clones: O(1) VDIs sharing their source's generation file.
 * A snapshot reads the content it was taken with whatever happens to its
 * source; every write path refuses it; deleting either side frees only what
 * it alone held. qemu-img judges the files at rest of vhd and qcow2 SRs.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { api, createVdi, execFileP, sha256Url, type TransferJson } from './helpers/api.js';
import { seededBytes, startServer, type TestServer, tempDir } from './helpers/server.js';
import { waitFor } from './helpers/wait.js';

const MiB = 1024 * 1024;
const TiB = 1024 ** 4;
const SIZE = 8 * MiB;

type VdiJson = {
  id: string;
  name_label: string;
  virtual_size: number;
  physical_utilisation: number;
  image_format: string;
  generation: number;
  read_only: boolean;
  is_snapshot: boolean;
  snapshot_of: string | null;
  snapshot_time: string | null;
  content_updated_at: string;
};
type ErrorBody = { error: { code: string; message: string; details?: Record<string, unknown> } };
type Task = { id: string; status: string; error: { code: string } | null };

const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** A disk image with data in a few places and holes between them. */
function content(seed: number): Buffer {
  const disk = Buffer.alloc(SIZE);
  for (const [at, len] of [
    [0, MiB],
    [3 * MiB + 512, 2 * MiB],
    [SIZE - 64 * 1024, 64 * 1024],
  ]) {
    seededBytes(len, seed + at).copy(disk, at);
  }
  return disk;
}

describe('snapshots and clones', () => {
  let srv: TestServer;
  let work: string;
  let srDir: string;

  before(async () => {
    work = await tempDir();
    srv = await startServer({ allowFetch: ['127.0.0.0/8'] });
    srDir = path.join(srv.dataDir, 'srs', 'local');
  });
  after(async () => {
    await srv.close();
    await fsp.rm(srv.dataDir, { recursive: true, force: true });
    await fsp.rm(work, { recursive: true, force: true });
  });

  const put = async (id: string, body: Buffer, format = 'raw') => {
    const res = await fetch(`${srv.url}/v1/vdis/${id}/contents?format=${format}`, {
      method: 'PUT',
      body: new Uint8Array(body),
    });
    return { status: res.status, body: (await res.json()) as Task & ErrorBody };
  };
  const importRaw = async (id: string, body: Buffer) => {
    const res = await put(id, body);
    assert.equal(res.status, 200, JSON.stringify(res.body));
  };
  const vdi = async (id: string) => {
    const res = await api<VdiJson>(srv.url, 'GET', `/v1/vdis/${id}`);
    assert.equal(res.status, 200, JSON.stringify(res.body));
    return res.body;
  };
  const snapshot = async (id: string, body?: Record<string, unknown>) => {
    const res = await api<VdiJson>(srv.url, 'POST', `/v1/vdis/${id}/snapshots`, body);
    assert.equal(res.status, 201, JSON.stringify(res.body));
    assert.equal(res.headers.get('location'), `/v1/vdis/${res.body.id}`);
    return res.body;
  };
  const clone = async (id: string, body?: Record<string, unknown>) => {
    const res = await api<VdiJson>(srv.url, 'POST', `/v1/vdis/${id}/clone`, body);
    assert.equal(res.status, 201, JSON.stringify(res.body));
    return res.body;
  };
  const shaOf = (id: string, format = 'raw') =>
    sha256Url(`${srv.url}/v1/vdis/${id}/contents?format=${format}`);
  const fileOf = async (id: string) => {
    const v = await vdi(id);
    return path.join(srDir, `${v.id}.g${v.generation}.${v.image_format}`);
  };
  const srUsed = async () =>
    (await api<{ physical_utilisation: number }>(srv.url, 'GET', '/v1/srs/local')).body.physical_utilisation;
  const generationFiles = async () => (await fsp.readdir(srDir)).filter((n) => /\.g\d+\./.test(n)).sort();
  const stagingFiles = () => fsp.readdir(path.join(srDir, '.staging'));

  for (const format of ['raw', 'vhd', 'qcow2'] as const) {
    test(`${format} SR: a snapshot keeps the old bytes after the VDI is imported again; the VDI reads the new`, async () => {
      const source = await createVdi(srv.url, SIZE, { name_label: 'db root', image_format: format });
      const old = content(1);
      const next = content(2);
      await importRaw(source.id, old);
      const before = await vdi(source.id);

      const snap = await snapshot(source.id, { name_label: 'nightly' });
      assert.equal(snap.is_snapshot, true);
      assert.equal(snap.read_only, true);
      assert.equal(snap.snapshot_of, source.id);
      assert.ok(snap.snapshot_time && Math.abs(Date.parse(snap.snapshot_time) - Date.now()) < 60_000);
      assert.equal(snap.name_label, 'nightly');
      assert.equal(snap.virtual_size, SIZE);
      assert.equal(snap.image_format, format);
      assert.equal(snap.content_updated_at, before.content_updated_at, 'its content was last changed then');
      const unnamed = await snapshot(source.id);
      assert.equal(unnamed.name_label, 'db root', "the source's name by default");
      const live = await vdi(source.id);
      assert.equal(live.is_snapshot, false);
      assert.equal(live.read_only, false);
      assert.equal(live.snapshot_of, null);
      assert.equal(live.generation, before.generation, 'a snapshot does not change its source');

      await importRaw(source.id, next);
      assert.equal(await shaOf(snap.id), sha256(old));
      assert.equal(await shaOf(source.id), sha256(next));

      // The files at rest, judged by qemu-img against the raw bytes.
      const oldRaw = path.join(work, `old-${format}.raw`);
      const nextRaw = path.join(work, `next-${format}.raw`);
      await fsp.writeFile(oldRaw, old);
      await fsp.writeFile(nextRaw, next);
      const qfmt = format === 'vhd' ? 'vpc' : format;
      await execFileP('qemu-img', ['compare', '-f', qfmt, '-F', 'raw', await fileOf(snap.id), oldRaw]);
      await execFileP('qemu-img', ['compare', '-f', qfmt, '-F', 'raw', await fileOf(source.id), nextRaw]);
      if (format === 'qcow2') await execFileP('qemu-img', ['check', '-f', qfmt, await fileOf(snap.id)]);
      // And its exports in every format.
      for (const wire of ['vhd', 'qcow2'] as const) {
        const out = path.join(work, `snap-${format}.${wire}`);
        const res = await fetch(`${srv.url}/v1/vdis/${snap.id}/contents?format=${wire}`);
        assert.equal(res.status, 200);
        await fsp.writeFile(out, Buffer.from(await res.arrayBuffer()));
        await execFileP('qemu-img', [
          'compare',
          '-f',
          wire === 'vhd' ? 'vpc' : wire,
          '-F',
          'raw',
          out,
          oldRaw,
        ]);
      }

      const listed = await api<VdiJson[]>(srv.url, 'GET', `/v1/vdis/${source.id}/snapshots`);
      assert.equal(listed.status, 200);
      assert.deepEqual(
        listed.body.map((v) => v.id),
        [unnamed.id, snap.id],
        'newest first',
      );
      const snaps = await api<VdiJson[]>(srv.url, 'GET', `/v1/vdis?is_snapshot=true&limit=1000`);
      assert.ok(snaps.body.some((v) => v.id === snap.id));
      assert.ok(snaps.body.every((v) => v.is_snapshot));
      const plain = await api<VdiJson[]>(srv.url, 'GET', `/v1/vdis?is_snapshot=false&limit=1000`);
      assert.ok(plain.body.some((v) => v.id === source.id));
      assert.ok(plain.body.every((v) => !v.is_snapshot));
    });
  }

  test('a snapshot of a 1 TiB sparse VDI is instant and adds no space: the same inode, one more link', async () => {
    const source = await createVdi(srv.url, TiB, { image_format: 'raw' });
    // A qcow2 with 4 MiB of data near the end of the 1 TiB disk, converted into the raw VDI.
    const q = path.join(work, 'big.qcow2');
    await execFileP('qemu-img', ['create', '-f', 'qcow2', q, String(TiB)]);
    await execFileP('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x5a ${TiB - 8 * MiB} 4M`, q]);
    const res = await put(source.id, await fsp.readFile(q), 'qcow2');
    assert.equal(res.status, 200, JSON.stringify(res.body));
    const file = await fileOf(source.id);
    const usedBefore = await srUsed();
    const st = await fsp.stat(file);
    assert.equal(st.nlink, 1);

    const started = process.hrtime.bigint();
    const snap = await snapshot(source.id);
    const ms = Number(process.hrtime.bigint() - started) / 1e6;
    assert.ok(ms < 2000, `a snapshot took ${ms} ms`);

    const snapStat = await fsp.stat(await fileOf(snap.id));
    assert.equal(snapStat.ino, st.ino, 'the snapshot names the same file');
    assert.equal(snapStat.blocks, st.blocks);
    assert.equal((await fsp.stat(file)).nlink, 2);
    assert.equal(await srUsed(), usedBefore, 'the SR counts the shared file once');
    assert.equal(snap.physical_utilisation, st.blocks * 512);

    const extents = await api<{ start: number; length: number; zero: boolean }[]>(
      srv.url,
      'GET',
      `/v1/vdis/${snap.id}/extents`,
    );
    assert.deepEqual(
      extents.body.filter((e) => !e.zero),
      [{ start: TiB - 8 * MiB, length: 4 * MiB, zero: false }],
    );
    const range = await fetch(`${srv.url}/v1/vdis/${snap.id}/contents`, {
      headers: { range: `bytes=${TiB - 8 * MiB}-${TiB - 8 * MiB + 3}` },
    });
    assert.equal(range.status, 206);
    assert.deepEqual([...new Uint8Array(await range.arrayBuffer())], [0x5a, 0x5a, 0x5a, 0x5a]);

    // Deleting the snapshot drops its link only; the VDI's file stays whole.
    assert.equal((await fetch(`${srv.url}/v1/vdis/${snap.id}`, { method: 'DELETE' })).status, 204);
    assert.equal((await fsp.stat(file)).nlink, 1);
    assert.equal((await fsp.stat(file)).blocks, st.blocks);
    await fsp.rm(q);
    assert.equal((await fetch(`${srv.url}/v1/vdis/${source.id}`, { method: 'DELETE' })).status, 204);
  });

  test('every write to a snapshot is 409 VDI_READ_ONLY and changes nothing; a rename is allowed', async () => {
    const source = await createVdi(srv.url, SIZE);
    await importRaw(source.id, content(3));
    const snap = await snapshot(source.id);
    const sha = sha256(content(3));
    const files = await generationFiles();
    const tasksBefore = (await api<Task[]>(srv.url, 'GET', `/v1/tasks?vdi=${snap.id}&type=import`)).body
      .length;

    const refused = (what: string, status: number, body: unknown) => {
      assert.equal(status, 409, `${what}: ${JSON.stringify(body)}`);
      assert.equal((body as ErrorBody).error.code, 'VDI_READ_ONLY', what);
      assert.equal((body as ErrorBody).error.details?.vdi, snap.id, what);
    };

    for (const format of ['raw', 'vhd', 'qcow2']) {
      const one = await put(snap.id, content(4).subarray(0, MiB), format);
      refused(`one-shot ${format} import`, one.status, one.body);
    }
    const probe = await put(snap.id, Buffer.alloc(0));
    refused('an empty one-shot import (the probe Xen Orchestra sends)', probe.status, probe.body);
    const chunked = await fetch(`${srv.url}/v1/vdis/${snap.id}/contents?format=raw`, {
      method: 'PUT',
      body: new Blob([new Uint8Array(MiB)]).stream(),
      duplex: 'half',
    } as RequestInit);
    refused('a chunked one-shot import', chunked.status, await chunked.json());

    const session = await api(srv.url, 'POST', '/v1/transfers', {
      vdi: snap.id,
      direction: 'upload',
      format: 'raw',
    });
    refused('an upload session', session.status, session.body);

    const pull = await api(srv.url, 'POST', '/v1/transfers', {
      vdi: snap.id,
      direction: 'upload',
      format: 'raw',
      source_url: `${srv.url}/v1/vdis/${source.id}/contents`,
    });
    refused('a pull', pull.status, pull.body);

    const tus = await fetch(`${srv.url}/v1/tus/`, {
      method: 'POST',
      headers: {
        'tus-resumable': '1.0.0',
        'upload-length': String(MiB),
        'upload-metadata': `vdi ${Buffer.from(snap.id).toString('base64')},format ${Buffer.from('raw').toString('base64')}`,
      },
    });
    refused('a tus upload', tus.status, await tus.json());

    const xapi = await fetch(`${srv.url}/import_raw_vdi?vdi=${snap.id}&format=raw`, {
      method: 'PUT',
      body: new Uint8Array(MiB),
    });
    refused('the xapi alias', xapi.status, await xapi.json());
    const xapiProbe = await fetch(`${srv.url}/import_raw_vdi?vdi=${snap.id}&format=vhd`, {
      method: 'PUT',
      body: new Uint8Array(0),
    });
    refused("the xapi alias's empty probe", xapiProbe.status, await xapiProbe.json());

    const resize = await api(srv.url, 'PATCH', `/v1/vdis/${snap.id}`, { virtual_size: 2 * SIZE });
    refused('a resize', resize.status, resize.body);

    const again = await api<ErrorBody>(srv.url, 'POST', `/v1/vdis/${snap.id}/snapshots`);
    assert.equal(again.status, 409);
    assert.equal(again.body.error.code, 'VDI_IS_SNAPSHOT');

    // Nothing changed: content, row, files, no staging left, no import task started.
    const after = await vdi(snap.id);
    assert.equal(after.generation, 0);
    assert.equal(after.virtual_size, SIZE);
    assert.equal(await shaOf(snap.id), sha);
    assert.deepEqual(await generationFiles(), files);
    assert.deepEqual(await stagingFiles(), []);
    assert.equal(
      (await api<Task[]>(srv.url, 'GET', `/v1/tasks?vdi=${snap.id}&type=import`)).body.length,
      tasksBefore,
    );

    const renamed = await api<VdiJson>(srv.url, 'PATCH', `/v1/vdis/${snap.id}`, {
      name_label: 'before the upgrade',
      virtual_size: SIZE,
    });
    assert.equal(renamed.status, 200, JSON.stringify(renamed.body));
    assert.equal(renamed.body.name_label, 'before the upgrade');
  });

  test('a snapshot is read like any VDI: formats, ranges, extents, checksum, download session, push', async () => {
    const source = await createVdi(srv.url, SIZE, { image_format: 'qcow2' });
    const data = content(5);
    await importRaw(source.id, data);
    const snap = await snapshot(source.id);
    await importRaw(source.id, content(6));

    const range = await fetch(`${srv.url}/v1/vdis/${snap.id}/contents`, {
      headers: { range: `bytes=${3 * MiB}-${4 * MiB - 1}` },
    });
    assert.equal(range.status, 206);
    assert.ok(Buffer.from(await range.arrayBuffer()).equals(data.subarray(3 * MiB, 4 * MiB)));

    const xapi = await fetch(`${srv.url}/export_raw_vdi?vdi=${snap.id}&format=raw`);
    assert.equal(sha256(Buffer.from(await xapi.arrayBuffer())), sha256(data));

    const checksum = await api<{ checksum: string }>(srv.url, 'GET', `/v1/vdis/${snap.id}/checksum`);
    assert.equal(checksum.status, 200);
    assert.equal(checksum.body.checksum, sha256(data));

    const extents = await api<{ start: number; length: number; zero: boolean }[]>(
      srv.url,
      'GET',
      `/v1/vdis/${snap.id}/extents`,
    );
    assert.equal(extents.status, 200);
    assert.equal(extents.body[0].start, 0);
    assert.equal(extents.body[0].zero, false);

    const download = await api<TransferJson>(srv.url, 'POST', '/v1/transfers', {
      vdi: snap.id,
      direction: 'download',
      format: 'raw',
    });
    assert.equal(download.status, 201, JSON.stringify(download.body));
    assert.equal(await sha256Url(download.body.url), sha256(data));
    assert.equal(
      (
        await fetch(`${download.body.url.split('/data')[0]}?token=${download.body.token}`, {
          method: 'DELETE',
        })
      ).status,
      200,
    );

    // Push the snapshot into a fresh VDI of this same service.
    const target = await createVdi(srv.url, SIZE);
    const receiving = await api<TransferJson>(srv.url, 'POST', '/v1/transfers', {
      vdi: target.id,
      direction: 'upload',
      format: 'raw',
    });
    const push = await api<TransferJson>(srv.url, 'POST', '/v1/transfers', {
      vdi: snap.id,
      direction: 'download',
      format: 'raw',
      target_url: receiving.body.url,
    });
    assert.equal(push.status, 201, JSON.stringify(push.body));
    const done = await waitFor('the push to finish', async () => {
      const t = (await api<Task>(srv.url, 'GET', `/v1/tasks/${push.body.task_id}?wait=5`)).body;
      return t.status === 'running' || t.status === 'pending' ? null : t;
    });
    assert.equal(done.status, 'success', JSON.stringify(done));
    await waitFor('the pushed content to commit', async () => (await vdi(target.id)).generation > 0);
    assert.equal(await shaOf(target.id), sha256(data));
  });

  test('deleting a VDI leaves its snapshots readable; deleting the last name of a file frees it', async () => {
    const source = await createVdi(srv.url, SIZE);
    const data = content(7);
    await importRaw(source.id, data);
    const a = await snapshot(source.id);
    const b = await snapshot(source.id);
    const shared = await fileOf(source.id);
    assert.equal((await fsp.stat(shared)).nlink, 3);
    const usedBefore = await srUsed();

    assert.equal((await fetch(`${srv.url}/v1/vdis/${source.id}`, { method: 'DELETE' })).status, 204);
    assert.equal((await api(srv.url, 'GET', `/v1/vdis/${source.id}`)).status, 404);
    for (const s of [a, b]) {
      const kept = await vdi(s.id);
      assert.equal(kept.snapshot_of, source.id, 'snapshot_of names the deleted VDI');
      assert.equal(await shaOf(s.id), sha256(data));
    }
    assert.equal(await srUsed(), usedBefore, 'the blocks are still held by the snapshots');
    const list = await api<ErrorBody>(srv.url, 'GET', `/v1/vdis/${source.id}/snapshots`);
    assert.equal(list.status, 404);
    assert.equal(list.body.error.code, 'VDI_NOT_FOUND');
    const byFilter = await api<VdiJson[]>(srv.url, 'GET', `/v1/vdis?snapshot_of=${source.id}`);
    assert.deepEqual(
      byFilter.body.map((v) => v.id),
      [b.id, a.id],
    );

    const aFile = await fileOf(a.id);
    const bFile = await fileOf(b.id);
    assert.equal((await fetch(`${srv.url}/v1/vdis/${a.id}`, { method: 'DELETE' })).status, 204);
    await assert.rejects(fsp.stat(aFile), { code: 'ENOENT' });
    assert.equal((await fsp.stat(bFile)).nlink, 1);
    assert.equal(await shaOf(b.id), sha256(data));
    assert.equal(await srUsed(), usedBefore);

    assert.equal((await fetch(`${srv.url}/v1/vdis/${b.id}`, { method: 'DELETE' })).status, 204);
    await assert.rejects(fsp.stat(bFile), { code: 'ENOENT' });
    assert.ok(
      (await srUsed()) <= usedBefore - 3 * MiB,
      'the data only the last snapshot held is freed with it',
    );
  });

  test('a snapshot taken while an upload session is open holds the committed content; the upload commits to the VDI only', async () => {
    const source = await createVdi(srv.url, SIZE);
    const committed = content(12);
    const uploading = content(13);
    await importRaw(source.id, committed);
    const session = await api<TransferJson>(srv.url, 'POST', '/v1/transfers', {
      vdi: source.id,
      direction: 'upload',
      format: 'raw',
      size: SIZE,
    });
    assert.equal(session.status, 201, JSON.stringify(session.body));
    const half = SIZE / 2;
    const chunk = await fetch(session.body.url, {
      method: 'PUT',
      headers: { 'content-range': `bytes 0-${half - 1}/${SIZE}` },
      body: new Uint8Array(uploading.subarray(0, half)),
    });
    assert.equal(chunk.status, 200, await chunk.text());

    const snap = await snapshot(source.id);
    assert.equal(await shaOf(snap.id), sha256(committed));
    const rest = await fetch(session.body.url, {
      method: 'PUT',
      headers: { 'content-range': `bytes ${half}-${SIZE - 1}/${SIZE}` },
      body: new Uint8Array(uploading.subarray(half)),
    });
    assert.equal(rest.status, 200, await rest.text());
    const fin = await api<Task>(
      srv.url,
      'POST',
      `/v1/transfers/${session.body.id}/finalize?token=${session.body.token}&wait=60`,
    );
    assert.equal(fin.body.status, 'success', JSON.stringify(fin.body));
    assert.equal(await shaOf(source.id), sha256(uploading));
    assert.equal(await shaOf(snap.id), sha256(committed));
    const ofSnapshot = await api<VdiJson[]>(srv.url, 'GET', `/v1/vdis/${snap.id}/snapshots`);
    assert.deepEqual(ofSnapshot.body, [], 'a snapshot has no snapshots');
  });

  test('lists of snapshots page like other lists', async () => {
    const source = await createVdi(srv.url, MiB);
    const made: string[] = [];
    for (let i = 0; i < 3; i++) made.unshift((await snapshot(source.id, { name_label: `s${i}` })).id);
    const first = await api<VdiJson[]>(srv.url, 'GET', `/v1/vdis/${source.id}/snapshots?limit=2`);
    assert.deepEqual(
      first.body.map((v) => v.id),
      made.slice(0, 2),
    );
    const link = /<([^>]+)>; rel="next"/.exec(first.headers.get('link') ?? '');
    assert.ok(link, 'a next link');
    const second = await api<VdiJson[]>(srv.url, 'GET', link[1]);
    assert.deepEqual(
      second.body.map((v) => v.id),
      made.slice(2),
    );
    assert.equal(second.headers.get('link'), null);

    const bad = await api<ErrorBody>(srv.url, 'GET', '/v1/vdis?is_snapshot=yes');
    assert.equal(bad.status, 400);
    assert.equal(bad.body.error.code, 'INVALID_REQUEST');
    const badBody = await api<ErrorBody>(srv.url, 'POST', `/v1/vdis/${source.id}/snapshots`, { label: 'x' });
    assert.equal(badBody.status, 400);
    const missing = await api<ErrorBody>(srv.url, 'POST', '/v1/vdis/no-such-vdi/snapshots');
    assert.equal(missing.status, 404);
    assert.equal(missing.body.error.code, 'VDI_NOT_FOUND');
  });

  test('a clone is writable, independent of its source, and O(1) in the same SR', async () => {
    const source = await createVdi(srv.url, SIZE, { name_label: 'gold', image_format: 'vhd' });
    const gold = content(8);
    await importRaw(source.id, gold);
    const usedBefore = await srUsed();

    const c = await clone(source.id, { name_label: 'web-02' });
    assert.equal(c.name_label, 'web-02');
    assert.equal(c.read_only, false);
    assert.equal(c.is_snapshot, false);
    assert.equal(c.snapshot_of, null);
    assert.equal(c.image_format, 'vhd');
    assert.equal((await fsp.stat(await fileOf(c.id))).ino, (await fsp.stat(await fileOf(source.id))).ino);
    assert.equal(await srUsed(), usedBefore);
    assert.equal(await shaOf(c.id), sha256(gold));

    // A write to either one leaves the other as it was.
    await importRaw(c.id, content(9));
    assert.equal(await shaOf(c.id), sha256(content(9)));
    assert.equal(await shaOf(source.id), sha256(gold));
    const c2 = await clone(source.id, { sr: 'local' });
    assert.equal(c2.name_label, 'gold');
    await importRaw(source.id, content(10));
    assert.equal(await shaOf(c2.id), sha256(gold));
    assert.equal(await shaOf(source.id), sha256(content(10)));
    const goldRaw = path.join(work, 'gold.raw');
    await fsp.writeFile(goldRaw, gold);
    await execFileP('qemu-img', ['compare', '-f', 'vpc', '-F', 'raw', await fileOf(c2.id), goldRaw]);

    // A clone of a snapshot is the way back to a writable disk.
    const snap = await snapshot(c2.id);
    const restored = await clone(snap.id);
    assert.equal(restored.is_snapshot, false);
    assert.equal(restored.read_only, false);
    await importRaw(restored.id, content(11));
    assert.equal(await shaOf(snap.id), sha256(gold));

    const noSr = await api<ErrorBody>(srv.url, 'POST', `/v1/vdis/${source.id}/clone`, { sr: 'elsewhere' });
    assert.equal(noSr.status, 404);
    assert.equal(noSr.body.error.code, 'SR_NOT_FOUND');
    const bad = await api<ErrorBody>(srv.url, 'POST', `/v1/vdis/${source.id}/clone`, { virtual_size: 512 });
    assert.equal(bad.status, 400);
    const missing = await api<ErrorBody>(srv.url, 'POST', '/v1/vdis/no-such-vdi/clone');
    assert.equal(missing.status, 404);
  });
});
