/**
 * Copies into another SR: a clone there (a new VDI) and a migration (the same
 * VDI, moved), each a task that copies only the data, in the destination's
 * format, refuses what the destination cannot take before a byte moves, and
 * leaves nothing behind when cancelled. qemu-img judges the files at rest.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { parseConfig, type SrConfig } from '../src/config.js';
import { api, createVdi, curl, execFileP, sha256Url } from './helpers/api.js';
import { seededBytes, startServer, type TestServer, tempDir } from './helpers/server.js';
import { waitFor } from './helpers/wait.js';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;

type VdiJson = {
  id: string;
  sr: string;
  image_format: string;
  generation: number;
  virtual_size: number;
  physical_utilisation: number;
  is_snapshot: boolean;
};
type Task = {
  id: string;
  type: string;
  status: string;
  vdi: string | null;
  bytes_done: number;
  bytes_total: number | null;
  progress: number;
  error: { code: string; message: string } | null;
  result: Record<string, unknown> | null;
};
type ErrorBody = { error: { code: string; message: string; details: Record<string, unknown> } };

const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');
const QEMU_FORMAT: Record<string, string> = { raw: 'raw', vhd: 'vpc', qcow2: 'qcow2' };

/** Data in three places, holes between. */
function content(seed: number): Buffer {
  const disk = Buffer.alloc(SIZE);
  for (const [at, len] of [
    [0, MiB],
    [5 * MiB + 4096, 3 * MiB],
    [SIZE - 128 * 1024, 128 * 1024],
  ]) {
    seededBytes(len, seed + at).copy(disk, at);
  }
  return disk;
}

describe('copies into another SR', () => {
  let srv: TestServer;
  let work: string;
  let srs: SrConfig[];
  const dirOf = (sr: string) =>
    sr === 'local' ? path.join(srv.dataDir, 'srs', 'local') : (srs.find((s) => s.id === sr)?.path ?? '');

  before(async () => {
    work = await tempDir();
    srs = parseConfig(
      ['--sr', `fast=${path.join(work, 'fast')}:qcow2,raw`, '--sr', `arch=${path.join(work, 'arch')}:vhd`],
      {},
    ).srs;
    srv = await startServer({ config: { srs } });
  });
  after(async () => {
    await srv.close();
    await fsp.rm(work, { recursive: true, force: true });
  });

  const vdi = async (id: string) => {
    const res = await api<VdiJson>(srv.url, 'GET', `/v1/vdis/${id}`);
    assert.equal(res.status, 200, JSON.stringify(res.body));
    return res.body;
  };
  const importRaw = async (id: string, body: Buffer) => {
    const res = await fetch(`${srv.url}/v1/vdis/${id}/contents?format=raw`, {
      method: 'PUT',
      body: new Uint8Array(body),
    });
    assert.equal(res.status, 200, await res.text());
  };
  const fileOf = (v: VdiJson) => path.join(dirOf(v.sr), `${v.id}.g${v.generation}.${v.image_format}`);
  const finished = async (task: Task) => {
    const res = await api<Task>(srv.url, 'GET', `/v1/tasks/${task.id}?wait=60`);
    assert.notEqual(res.body.status, 'running', 'the task finished within 60 s');
    return res.body;
  };
  const post = async (p: string, body: unknown) => api<Task & ErrorBody>(srv.url, 'POST', p, body);
  /** Judges a file at rest against the raw bytes it must hold. */
  const qemuSame = async (file: string, format: string, raw: Buffer) => {
    const rawFile = path.join(work, `expected-${Math.random()}.raw`);
    await fsp.writeFile(rawFile, raw);
    await execFileP('qemu-img', ['compare', '-f', QEMU_FORMAT[format], '-F', 'raw', file, rawFile]);
    if (format === 'qcow2') {
      const { stdout } = await execFileP('qemu-img', ['check', '-f', 'qcow2', file]);
      assert.match(stdout, /No errors/);
    }
    // qemu-img checks no VHD: its own reading of the file must agree.
    const { stdout } = await execFileP('qemu-img', ['info', '--output=json', file]);
    assert.equal(JSON.parse(stdout).format, QEMU_FORMAT[format]);
    await fsp.rm(rawFile);
  };
  const noCopyLeft = async (sr: string) => {
    assert.deepEqual(await fsp.readdir(path.join(dirOf(sr), '.staging')), [], `nothing staged in ${sr}`);
  };

  for (const [sr, format] of [
    ['arch', 'vhd'],
    ['fast', 'qcow2'],
    ['fast', 'raw'],
  ] as const) {
    test(`a clone into SR ${sr} as ${format} is a task that copies only the data; the clone is independent`, async () => {
      const source = await createVdi(srv.url, SIZE, { name_label: 'gold' });
      const data = content(format.length);
      await importRaw(source.id, data);
      const res = await post(`/v1/vdis/${source.id}/clone`, { sr, image_format: format, name_label: 'copy' });
      assert.equal(res.status, 202, JSON.stringify(res.body));
      assert.equal(res.headers.get('location'), `/v1/tasks/${res.body.id}`);
      assert.equal(res.body.type, 'clone');
      const task = await finished(res.body);
      assert.equal(task.status, 'success', JSON.stringify(task.error));
      assert.equal(task.progress, 1);
      assert.ok(task.bytes_total !== null && task.bytes_total < SIZE * 0.75, 'only the data is counted');
      const cloneId = String(task.result?.vdi);
      const clone = await vdi(cloneId);
      assert.equal(clone.sr, sr);
      assert.equal(clone.image_format, format);
      assert.equal(clone.is_snapshot, false);
      assert.ok(
        clone.physical_utilisation < SIZE / 2,
        `sparse: ${clone.physical_utilisation} bytes allocated`,
      );
      assert.equal(await sha256Url(`${srv.url}/v1/vdis/${cloneId}/contents`), sha256(data));
      await qemuSame(fileOf(clone), format, data);
      await noCopyLeft(sr);

      const next = content(99);
      await importRaw(cloneId, next);
      assert.equal(
        await sha256Url(`${srv.url}/v1/vdis/${source.id}/contents`),
        sha256(data),
        'the source is untouched',
      );
      assert.equal(await sha256Url(`${srv.url}/v1/vdis/${cloneId}/contents`), sha256(next));
    });
  }

  test('a clone in the same SR and format stays a shared file, made at once (201)', async () => {
    const source = await createVdi(srv.url, SIZE, { sr: 'fast' });
    const res = await api<VdiJson>(srv.url, 'POST', `/v1/vdis/${source.id}/clone`, {
      sr: 'fast',
      image_format: 'qcow2',
    });
    assert.equal(res.status, 201);
    assert.equal(res.body.sr, 'fast');
  });

  test('a migration moves the VDI: same id, new SR and format, same bytes, its snapshots still there', async () => {
    const source = await createVdi(srv.url, SIZE, { name_label: 'db' });
    const data = content(5);
    await importRaw(source.id, data);
    const snap = (await api<VdiJson>(srv.url, 'POST', `/v1/vdis/${source.id}/snapshots`, {})).body;
    const before = await vdi(source.id);

    let at = before;
    for (const [sr, format] of [
      ['fast', 'qcow2'],
      ['arch', 'vhd'],
      ['fast', 'raw'],
      ['local', 'raw'],
    ] as const) {
      const res = await post(`/v1/vdis/${source.id}/migrate`, { sr, image_format: format });
      assert.equal(res.status, 202, JSON.stringify(res.body));
      assert.equal(res.body.type, 'migrate');
      assert.equal(res.body.vdi, source.id);
      const task = await finished(res.body);
      assert.equal(task.status, 'success', JSON.stringify(task.error));
      const moved = await vdi(source.id);
      assert.equal(moved.sr, sr);
      assert.equal(moved.image_format, format);
      assert.equal(moved.generation, at.generation + 1);
      assert.deepEqual(task.result, {
        vdi: source.id,
        sr,
        image_format: format,
        generation: moved.generation,
      });
      assert.ok(moved.physical_utilisation < SIZE / 2, 'sparse');
      assert.equal(await sha256Url(`${srv.url}/v1/vdis/${source.id}/contents`), sha256(data));
      await qemuSame(fileOf(moved), format, data);
      // The file it left is removed (in the background: nobody waits for its blocks).
      await waitFor('the old file to go', async () => !(await fsp.stat(fileOf(at)).catch(() => null)));
      await noCopyLeft(sr);
      // Its block digests moved with it: nothing changed since the snapshot.
      const changed = await api<{ bitmap: string }>(
        srv.url,
        'GET',
        `/v1/vdis/${source.id}/changed-blocks?base=${snap.id}`,
      );
      assert.equal(changed.status, 200, JSON.stringify(changed.body));
      assert.ok(
        Buffer.from(changed.body.bitmap, 'base64').every((b) => b === 0),
        'no block is dirty',
      );
      at = moved;
    }
    const snaps = await api<VdiJson[]>(srv.url, 'GET', `/v1/vdis/${source.id}/snapshots`);
    assert.deepEqual(
      snaps.body.map((s) => s.id),
      [snap.id],
    );
    assert.equal((await vdi(snap.id)).sr, 'local', 'a snapshot stays where it was');
    assert.equal(await sha256Url(`${srv.url}/v1/vdis/${snap.id}/contents`), sha256(data));

    // Into its own SR and format: nothing to do, and said so at once.
    const same = await post(`/v1/vdis/${source.id}/migrate`, { sr: 'local' });
    assert.equal(same.status, 202);
    assert.equal(same.body.status, 'success');
    assert.equal((await vdi(source.id)).generation, at.generation);
  });

  test('a raw VDI that is a layer over its snapshot, migrated, reads its own bytes and its snapshot its own, also after a restart and a commit', async () => {
    for (const [sr, format] of [
      ['fast', 'raw'],
      ['arch', 'vhd'],
    ] as const) {
      const source = await createVdi(srv.url, SIZE);
      const first = content(21);
      await importRaw(source.id, first);
      const snap = (await api<VdiJson>(srv.url, 'POST', `/v1/vdis/${source.id}/snapshots`, {})).body;
      // A commit after the snapshot makes the VDI a layer over the snapshot's content.
      const second = Buffer.from(first);
      seededBytes(2 * MiB, 22).copy(second, 8 * MiB);
      second.fill(0, 0, 64 * 1024);
      await importRaw(source.id, second);
      const task = await finished(
        (await post(`/v1/vdis/${source.id}/migrate`, { sr, image_format: format })).body,
      );
      assert.equal(task.status, 'success', JSON.stringify(task.error));
      assert.equal((await vdi(source.id)).image_format, format);
      const check = async (when: string) => {
        assert.equal(
          await sha256Url(`${srv.url}/v1/vdis/${source.id}/contents?format=raw`),
          sha256(second),
          `the migrated VDI ${when}`,
        );
        assert.equal(
          await sha256Url(`${srv.url}/v1/vdis/${snap.id}/contents?format=raw`),
          sha256(first),
          `its snapshot ${when}`,
        );
      };
      await check(`in ${sr} as ${format}`);
      await srv.close();
      srv = await startServer({ dataDir: srv.dataDir, config: { srs } });
      await check('after a restart');
      await qemuSame(fileOf(await vdi(source.id)), format, second);
      // A commit on the moved VDI builds on its own content, not on the chain it left.
      const third = Buffer.from(second);
      seededBytes(MiB, 23).copy(third, 2 * MiB);
      await importRaw(source.id, third);
      assert.equal(await sha256Url(`${srv.url}/v1/vdis/${source.id}/contents?format=raw`), sha256(third));
      assert.equal(await sha256Url(`${srv.url}/v1/vdis/${snap.id}/contents?format=raw`), sha256(first));
    }
  });

  test('the format defaults to the VDI’s own when the SR takes it, else to the SR’s default', async () => {
    const source = await createVdi(srv.url, SIZE, { image_format: 'qcow2' });
    const toFast = await finished((await post(`/v1/vdis/${source.id}/migrate`, { sr: 'fast' })).body);
    assert.equal(toFast.result?.image_format, 'qcow2');
    const toArch = await finished((await post(`/v1/vdis/${source.id}/migrate`, { sr: 'arch' })).body);
    assert.equal(toArch.result?.image_format, 'vhd');
  });

  test('what the destination cannot take is 400 FORMAT_NOT_SUPPORTED before a byte moves', async () => {
    const source = await createVdi(srv.url, SIZE);
    await importRaw(source.id, content(7));
    const before = await vdi(source.id);
    for (const [p, body] of [
      [`/v1/vdis/${source.id}/migrate`, { sr: 'arch', image_format: 'qcow2' }],
      [`/v1/vdis/${source.id}/migrate`, { sr: 'fast', image_format: 'vhd' }],
      [`/v1/vdis/${source.id}/migrate`, { sr: 'fast', image_format: 'vmdk' }],
      [`/v1/vdis/${source.id}/clone`, { sr: 'arch', image_format: 'raw' }],
    ] as const) {
      const res = await post(p, body);
      assert.equal(res.status, 400, `${p} ${JSON.stringify(body)}`);
      assert.equal(res.body.error.code, 'FORMAT_NOT_SUPPORTED');
      assert.ok(Array.isArray(res.body.error.details.supported_image_formats));
    }
    // A VHD holds at most 2040 GiB.
    const huge = await createVdi(srv.url, 3 * 1024 ** 4, { image_format: 'qcow2' });
    const tooBig = await post(`/v1/vdis/${huge.id}/migrate`, { sr: 'arch' });
    assert.equal(tooBig.status, 400);
    assert.equal(tooBig.body.error.code, 'FORMAT_NOT_SUPPORTED');
    assert.match(tooBig.body.error.message, /2040 GiB/);

    const unknownSr = await post(`/v1/vdis/${source.id}/migrate`, { sr: 'nope' });
    assert.equal(unknownSr.status, 404);
    assert.equal(unknownSr.body.error.code, 'SR_NOT_FOUND');
    const noSr = await post(`/v1/vdis/${source.id}/migrate`, {});
    assert.equal(noSr.status, 400);
    assert.equal(noSr.body.error.code, 'INVALID_REQUEST');

    assert.deepEqual(await vdi(source.id), before);
    for (const sr of ['fast', 'arch']) await noCopyLeft(sr);
    const tasks = await api<Task[]>(srv.url, 'GET', `/v1/tasks?vdi=${source.id}`);
    assert.ok(!tasks.body.some((t) => t.type === 'migrate' || t.type === 'clone'), 'no task was started');
  });

  describe('a large VDI', () => {
    const BIG = 256 * MiB;
    let bigId: string;
    let bigSha: string;
    before(async () => {
      bigId = (await createVdi(srv.url, BIG, { name_label: 'big' })).id;
      const file = path.join(work, 'big.raw');
      await execFileP('sh', [
        '-c',
        `head -c ${192 * MiB} /dev/urandom > ${file} && truncate -s ${BIG} ${file}`,
      ]);
      await curl(['-T', file, `${srv.url}/v1/vdis/${bigId}/contents?format=raw`]);
      bigSha = await sha256Url(`${srv.url}/v1/vdis/${bigId}/contents`);
      await fsp.rm(file);
    });

    const cancelMidway = async (task: Task) => {
      await waitFor(
        'bytes to move',
        async () => (await api<Task>(srv.url, 'GET', `/v1/tasks/${task.id}`)).body.bytes_done > 0,
        {
          intervalMs: 2,
        },
      );
      const cancel = await api<Task>(srv.url, 'POST', `/v1/tasks/${task.id}/cancel`);
      assert.equal(cancel.status, 202, JSON.stringify(cancel.body));
      const end = await finished(task);
      assert.equal(end.status, 'cancelled');
      assert.ok(end.bytes_done < (end.bytes_total ?? 0), 'cancelled mid-way');
      return end;
    };

    test('during a migration the VDI is busy to writers and readable; a cancel leaves it as it was', async () => {
      const before = await vdi(bigId);
      const start = await post(`/v1/vdis/${bigId}/migrate`, { sr: 'fast', image_format: 'qcow2' });
      assert.equal(start.status, 202);
      const busy = await fetch(`${srv.url}/v1/vdis/${bigId}/contents?format=raw`, {
        method: 'PUT',
        body: 'x'.repeat(512),
      });
      assert.equal(busy.status, 409);
      assert.equal(((await busy.json()) as ErrorBody).error.code, 'VDI_BUSY');
      const del = await api<ErrorBody>(srv.url, 'DELETE', `/v1/vdis/${bigId}`);
      assert.equal(del.status, 409);
      const again = await post(`/v1/vdis/${bigId}/migrate`, { sr: 'arch' });
      assert.equal(again.status, 409, 'one migration at a time');
      const range = await fetch(`${srv.url}/v1/vdis/${bigId}/contents`, {
        headers: { range: 'bytes=0-511' },
      });
      assert.equal(range.status, 206, 'reads go on');
      await cancelMidway(start.body);

      assert.deepEqual(await vdi(bigId), before);
      await noCopyLeft('fast');
      assert.ok(
        !(await fsp.readdir(dirOf('fast'))).some((f) => f.startsWith(bigId)),
        'no file of it in the destination',
      );
      assert.equal(await sha256Url(`${srv.url}/v1/vdis/${bigId}/contents`), bigSha);
      // The lock went with the task.
      await importRaw(bigId, Buffer.alloc(0));
    });

    test('a cancelled clone into another SR leaves no VDI and no file', async () => {
      const vdisBefore = (await api<VdiJson[]>(srv.url, 'GET', '/v1/vdis?limit=1000')).body.length;
      const start = await post(`/v1/vdis/${bigId}/clone`, { sr: 'arch' });
      assert.equal(start.status, 202);
      await cancelMidway(start.body);
      assert.equal((await api<VdiJson[]>(srv.url, 'GET', '/v1/vdis?limit=1000')).body.length, vdisBefore);
      await noCopyLeft('arch');
    });

    test('outcomes of copies are kept over a restart', async () => {
      const ok = await finished((await post(`/v1/vdis/${bigId}/clone`, { sr: 'fast' })).body);
      assert.equal(ok.status, 'success');
      await srv.close();
      srv = await startServer({ dataDir: srv.dataDir, config: { srs } });
      const tasks = (await api<Task[]>(srv.url, 'GET', `/v1/tasks?vdi=${bigId}&limit=100`)).body;
      const byType = (type: string, status: string) =>
        tasks.filter((t) => t.type === type && t.status === status);
      assert.equal(byType('migrate', 'cancelled').length, 1);
      assert.equal(byType('clone', 'cancelled').length, 1);
      assert.deepEqual(byType('clone', 'success')[0]?.result?.vdi, ok.result?.vdi);
      assert.equal(await sha256Url(`${srv.url}/v1/vdis/${String(ok.result?.vdi)}/contents`), bigSha);
    });
  });
});
