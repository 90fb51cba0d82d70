/**
 * A full disk is an error, not a wedge: on a 64 MiB tmpfs the test mounts,
 * every way an import can fill the SR (one-shot PUT, session chunks, tus, a
 * streaming import, a conversion at finalize, create, resize) answers 507
 * INSUFFICIENT_SPACE naming the space needed and free. What no client can
 * resume (a one-shot PUT, a failed finalize) frees what it staged, releases
 * the VDI and fails its task; a resumable session keeps what landed and goes
 * on once there is room. The metadata keeps its reserve, so everything else
 * goes on; and a server killed with the disk full starts again.
 */
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { SPACE_RECHECK_INTERVAL_MS } from '../src/image/space.js';
import { api, createVdi, curl, execFileP, sha256Url, type TransferJson } from './helpers/api.js';
import { seededBytes, spawnServer, startServer, type TestServer, tempDir } from './helpers/server.js';
import { cannotMount, mountTmpfs, type SmallFs } from './helpers/small-fs.js';

const MiB = 1024 * 1024;
const FS_MIB = 64;
const RESERVE = 8 * MiB;

type Task = { id: string; status: string; error: { code: string; message: string; status?: number } | null };
type SpaceError = {
  error: {
    code: string;
    message: string;
    details: { needed_bytes: number; free_bytes: number | null; reserve_bytes: number };
  };
};

const skip = await cannotMount();

describe('a full disk is an error, not a wedge', { skip: skip ?? false }, () => {
  let work: string;
  let fs: SmallFs;
  let srv: TestServer;
  /** Random (incompressible, never zero) files outside the small file system. */
  let raw100: string;

  before(async () => {
    work = await tempDir();
    raw100 = path.join(work, 'random-100m.raw');
    await fsp.writeFile(raw100, seededBytes(100 * MiB, 7));
  });
  after(() => fsp.rm(work, { recursive: true, force: true }));

  /** A fresh server whose data directory is on a fresh 64 MiB tmpfs. */
  async function smallServer(): Promise<void> {
    fs = await mountTmpfs(FS_MIB);
    srv = await startServer({
      dataDir: path.join(fs.dir, 'data'),
      config: { spaceReserveBytes: RESERVE },
    });
  }
  async function teardown(): Promise<void> {
    try {
      await srv?.close();
    } finally {
      await fs?.unmount();
      srv = undefined as unknown as TestServer;
      fs = undefined as unknown as SmallFs;
    }
  }

  const stagingDir = () => path.join(srv.dataDir, 'srs', 'local', '.staging');

  function assertSpaceError(body: unknown, label: string): SpaceError['error'] {
    const e = (body as SpaceError).error;
    assert.equal(e?.code, 'INSUFFICIENT_SPACE', `${label}: ${JSON.stringify(body)}`);
    assert.ok(e.details.needed_bytes > 0, `${label}: names the space needed`);
    assert.equal(typeof e.details.free_bytes, 'number', `${label}: names the space free`);
    assert.equal(e.details.reserve_bytes, RESERVE);
    assert.match(e.message, /needs .* more, and it has .* free/);
    assert.doesNotMatch(e.message, /ENOSPC|errno|\/tmp/);
    return e;
  }

  /** After a refusal: nothing staged, the space back, the VDI free, the task failed, and the rest of the service working. */
  async function assertNotWedged(vdi: string, taskId: string | null, freeBefore: number) {
    assert.deepEqual(await fsp.readdir(stagingDir()), [], 'the staged bytes are removed');
    const free = await fs.free();
    assert.ok(free > freeBefore - 4 * MiB, `the space is back: ${free} free, ${freeBefore} before`);
    if (taskId) {
      const task = await api<Task>(srv.url, 'GET', `/v1/tasks/${taskId}`);
      assert.equal(task.body.status, 'failure', JSON.stringify(task.body));
      assert.equal(task.body.error?.code, 'INSUFFICIENT_SPACE');
    }
    // The VDI is free: a new upload takes it, and a small one commits.
    const small = seededBytes(MiB, 3);
    const put = await fetch(`${srv.url}/v1/vdis/${vdi}/contents?format=raw`, {
      method: 'PUT',
      body: new Uint8Array(small),
    });
    assert.equal(put.status, 200, await put.text());
    // Creates and exports answer.
    const other = await createVdi(srv.url, 4 * MiB, { image_format: 'qcow2' });
    assert.ok(other.id);
    const exported = await fetch(`${srv.url}/v1/vdis/${vdi}/contents?format=qcow2`);
    assert.equal(exported.status, 200);
    await exported.arrayBuffer();
  }

  test('a one-shot PUT larger than the free space: 507 naming needed and free, staging freed, VDI released, task failed', async () => {
    await smallServer();
    try {
      const vdi = await createVdi(srv.url, 128 * MiB);
      const freeBefore = await fs.free();
      const out = await execFileP('curl', [
        '-sS',
        '-T',
        raw100,
        '-w',
        '\n%{http_code}',
        `${srv.url}/v1/vdis/${vdi.id}/contents?format=raw`,
      ]);
      const [body, status] = out.stdout.split('\n');
      assert.equal(status, '507', body);
      assertSpaceError(JSON.parse(body), 'one-shot PUT');
      const tasks = await api<{ id: string }[]>(srv.url, 'GET', `/v1/tasks?vdi=${vdi.id}&type=import`);
      await assertNotWedged(vdi.id, tasks.body[0].id, freeBefore);
      // The reserve was never touched: the metadata store still had room for all of it.
      assert.ok((await fs.free()) > RESERVE);
    } finally {
      await teardown();
    }
  });

  /**
   * While an SR is full (above its reserve), the rest of the service answers: metadata, creates, exports.
   * A raw create (no data written): the SR may be full to the byte of its reserve, where a qcow2's
   * header is rightly refused (with SQLite beside it there happened to be slack; on PostgreSQL not).
   */
  async function assertServiceGoesOn() {
    const other = await createVdi(srv.url, 4 * MiB, { image_format: 'raw' });
    assert.equal((await api(srv.url, 'GET', '/v1/vdis')).status, 200);
    const exported = await fetch(`${srv.url}/v1/vdis/${other.id}/contents?format=vhd`);
    assert.equal(exported.status, 200);
    await exported.arrayBuffer();
  }

  const uploadOffset = async (url: string, headers: Record<string, string> = {}) =>
    Number((await fetch(url, { method: 'HEAD', headers })).headers.get('upload-offset'));

  // 8 MiB chunks stream into the staging file; 1 MiB ones are read whole and written at once (small-chunk.ts).
  for (const chunk of [8 * MiB, MiB]) {
    test(`session chunks of ${chunk / MiB} MiB that fill the SR: 507 naming the space; the session keeps what landed and resumes once there is room`, async () => {
      await smallServer();
      try {
        const vdi = await createVdi(srv.url, 64 * MiB);
        // Someone else's file leaves room for 20 MiB of the 48 MiB upload.
        const filler = await fs.fill(RESERVE + 20 * MiB);
        await sleep(SPACE_RECHECK_INTERVAL_MS + 1);
        const size = 48 * MiB;
        const t = (
          await api<TransferJson>(srv.url, 'POST', '/v1/transfers', {
            vdi: vdi.id,
            direction: 'upload',
            format: 'raw',
            size,
          })
        ).body;
        const data = (await fsp.readFile(raw100)).subarray(0, size);
        let refused: Response | null = null;
        for (let at = 0; at < size && !refused; at += chunk) {
          const res = await fetch(t.url, {
            method: 'PUT',
            headers: { 'content-range': `bytes ${at}-${at + chunk - 1}/${size}` },
            body: new Uint8Array(data.subarray(at, at + chunk)),
          });
          if (res.status === 507) refused = res;
          else assert.equal(res.status, 200, await res.text());
        }
        assert.ok(refused, 'a chunk was refused');
        assertSpaceError(await refused.json(), 'session chunk');
        const offset = await uploadOffset(t.url);
        assert.ok(offset >= 16 * MiB, `what landed counts (offset ${offset})`);
        assert.equal((await api<TransferJson>(srv.url, 'GET', `/v1/transfers/${t.id}`)).body.state, 'open');
        await assertServiceGoesOn();
        // Room is made: the client sends the rest, and the import commits exact.
        await fsp.rm(filler);
        const rest = await fetch(t.url, {
          method: 'PUT',
          headers: { 'content-range': `bytes ${offset}-${size - 1}/${size}` },
          body: new Uint8Array(data.subarray(offset)),
        });
        assert.equal(rest.status, 200, await rest.text());
        const fin = await api<Task>(
          srv.url,
          'POST',
          `/v1/transfers/${t.id}/finalize?token=${t.token}&wait=60`,
        );
        assert.equal(fin.body.status, 'success', JSON.stringify(fin.body));
        const want = (await execFileP('sh', ['-c', `head -c ${size} ${raw100} | sha256sum`])).stdout.split(
          ' ',
        )[0];
        assert.equal(
          await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`, { range: `bytes=0-${size - 1}` }),
          want,
        );
        assert.deepEqual(await fsp.readdir(stagingDir()), []);
      } finally {
        await teardown();
      }
    });
  }

  test('a tus PATCH that fills the SR: 507; HEAD says what landed, and the upload completes once there is room', async () => {
    await smallServer();
    try {
      const vdi = await createVdi(srv.url, 64 * MiB);
      const filler = await fs.fill(RESERVE + 20 * MiB);
      await sleep(SPACE_RECHECK_INTERVAL_MS + 1);
      const size = 48 * MiB;
      const tus = { 'tus-resumable': '1.0.0' };
      const created = await fetch(`${srv.url}/v1/tus/`, {
        method: 'POST',
        headers: {
          ...tus,
          'upload-length': String(size),
          'upload-metadata': `vdi ${Buffer.from(vdi.id).toString('base64')},format ${Buffer.from('raw').toString('base64')}`,
        },
      });
      assert.equal(created.status, 201, await created.text());
      const location = new URL(created.headers.get('location')!, srv.url).href;
      const data = (await fsp.readFile(raw100)).subarray(0, size);
      const patch = (offset: number) =>
        fetch(location, {
          method: 'PATCH',
          headers: {
            ...tus,
            'upload-offset': String(offset),
            'content-type': 'application/offset+octet-stream',
          },
          body: new Uint8Array(data.subarray(offset)),
        });
      const first = await patch(0);
      assert.equal(first.status, 507, await first.clone().text());
      assertSpaceError(await first.json(), 'tus PATCH');
      // Only bytes written before the refused write can count (none, when the writer's flush failed).
      const offset = await uploadOffset(location, tus);
      assert.ok(offset < size, `HEAD: ${offset}`);
      await assertServiceGoesOn();
      await fsp.rm(filler);
      const second = await patch(offset);
      assert.equal(second.status, 204, await second.text());
      const want = (await execFileP('sh', ['-c', `head -c ${size} ${raw100} | sha256sum`])).stdout.split(
        ' ',
      )[0];
      assert.equal(
        await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`, { range: `bytes=0-${size - 1}` }),
        want,
      );
      assert.deepEqual(await fsp.readdir(stagingDir()), []);
    } finally {
      await teardown();
    }
  });

  test('a qcow2 streaming into its raw VDI (length unknown up front) that fills the SR: 507, and the rest resumes into the same disk', async () => {
    // 24 MiB of data: more than the room left; once the room is made, staged and copied (an
    // interrupted streaming import stages the rest), it fits.
    const raw24 = path.join(work, 'random-24m.raw');
    await fsp.writeFile(raw24, (await fsp.readFile(raw100)).subarray(0, 24 * MiB));
    const qcow2 = path.join(work, 'random-24m.qcow2');
    await execFileP('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw24, qcow2]);
    await smallServer();
    try {
      const vdi = await createVdi(srv.url, 64 * MiB);
      const filler = await fs.fill(RESERVE + 12 * MiB);
      await sleep(SPACE_RECHECK_INTERVAL_MS + 1);
      const t = (
        await api<TransferJson>(srv.url, 'POST', '/v1/transfers', {
          vdi: vdi.id,
          direction: 'upload',
          format: 'qcow2',
        })
      ).body;
      const out = await execFileP('curl', ['-sS', '-T', qcow2, '-w', '\n%{http_code}', t.url]);
      const [body, status] = out.stdout.split('\n');
      assert.equal(status, '507', body);
      assertSpaceError(JSON.parse(body), 'streaming import');
      const offset = await uploadOffset(t.url);
      assert.ok(offset < (await fsp.stat(qcow2)).size, `HEAD: ${offset}`);
      await fsp.rm(filler);
      const img = await fsp.readFile(qcow2);
      const rest = await fetch(t.url, {
        method: 'PUT',
        headers: { 'content-range': `bytes ${offset}-${img.length - 1}/${img.length}` },
        body: new Uint8Array(img.subarray(offset)),
      });
      assert.equal(rest.status, 200, await rest.text());
      const fin = await api<Task>(srv.url, 'POST', `/v1/transfers/${t.id}/finalize?token=${t.token}&wait=60`);
      assert.equal(fin.body.status, 'success', JSON.stringify(fin.body));
      const want = (await execFileP('sha256sum', [raw24])).stdout.split(' ')[0];
      assert.equal(
        await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`, { range: `bytes=0-${24 * MiB - 1}` }),
        want,
      );
      assert.deepEqual(await fsp.readdir(stagingDir()), []);
    } finally {
      await teardown();
    }
  });

  test('a declared qcow2 length that cannot fit is refused up front; a sparse raw one that fits its data is not', async () => {
    const qcow2 = path.join(work, 'random-up-front.qcow2');
    await execFileP('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw100, qcow2]);
    const qcow2Size = (await fsp.stat(qcow2)).size;
    await smallServer();
    try {
      const vdi = await createVdi(srv.url, 128 * MiB);
      const freeBefore = await fs.free();
      const open = await api(srv.url, 'POST', '/v1/transfers', {
        vdi: vdi.id,
        direction: 'upload',
        format: 'qcow2',
        size: qcow2Size,
      });
      assert.equal(open.status, 507, JSON.stringify(open.body));
      const e = assertSpaceError(open.body, 'declared size');
      assert.equal(e.details.needed_bytes, qcow2Size, 'needs the whole declared stream');
      assert.ok(e.details.free_bytes! <= freeBefore);
      // The one-shot PUT is refused before its body is read (Expect: 100-continue).
      const put = await execFileP('curl', [
        '-sS',
        '-T',
        qcow2,
        '-w',
        '\n%{http_code} %{size_upload}',
        `${srv.url}/v1/vdis/${vdi.id}/contents?format=qcow2`,
      ]);
      const [body, tail] = put.stdout.split('\n');
      const [status, uploaded] = tail.split(' ');
      assert.equal(status, '507', body);
      assertSpaceError(JSON.parse(body), 'one-shot declared');
      assert.ok(Number(uploaded) < qcow2Size / 2, `only ${uploaded} bytes were sent before the answer`);
      assert.deepEqual(await fsp.readdir(stagingDir()), []);

      // A raw stream is the disk: 100 MiB that hold 8 MiB of data import into 56 MiB.
      const sparse = path.join(work, 'sparse-100m.raw');
      const handle = await fsp.open(sparse, 'w');
      await handle.write(seededBytes(8 * MiB, 9), 0, 8 * MiB, 40 * MiB);
      await handle.truncate(100 * MiB);
      await handle.close();
      const ok = await curl(['-T', sparse, `${srv.url}/v1/vdis/${vdi.id}/contents?format=raw`]);
      assert.equal(JSON.parse(ok.toString()).status, 'success');
      const want = (await execFileP('sha256sum', [sparse])).stdout.split(' ')[0];
      const got = await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents?format=raw`, {
        range: `bytes=0-${100 * MiB - 1}`,
      });
      assert.equal(got, want);
    } finally {
      await teardown();
    }
  });

  test('a conversion at finalize that runs out: the task fails with 507, the VDI keeps its content, nothing is left', async () => {
    await smallServer();
    try {
      // Staged raw (33 MiB of data) fits in the 56 MiB above the reserve; its qcow2 copy does not.
      const vdi = await createVdi(srv.url, 64 * MiB, { image_format: 'qcow2' });
      const freeBefore = await fs.free();
      const data = seededBytes(33 * MiB, 5);
      const t = (
        await api<TransferJson>(srv.url, 'POST', '/v1/transfers', {
          vdi: vdi.id,
          direction: 'upload',
          format: 'raw',
          size: data.length,
        })
      ).body;
      const res = await fetch(t.url, { method: 'PUT', body: new Uint8Array(data) });
      assert.equal(res.status, 200, await res.text());
      const fin = await api<Task>(srv.url, 'POST', `/v1/transfers/${t.id}/finalize?token=${t.token}&wait=60`);
      assert.equal(fin.body.status, 'failure', JSON.stringify(fin.body));
      assert.equal(fin.body.error?.code, 'INSUFFICIENT_SPACE');
      assert.equal(fin.body.error?.status, 507);
      assert.doesNotMatch(fin.body.error!.message, /ENOSPC|errno/);
      const after = await api<{ generation: number }>(srv.url, 'GET', `/v1/vdis/${vdi.id}`);
      assert.equal(after.body.generation, 0, 'the VDI kept its content');
      const files = await fsp.readdir(path.join(srv.dataDir, 'srs', 'local'));
      assert.deepEqual(
        files.filter((f) => f !== '.staging').sort(),
        [`${vdi.id}.g0.digests`, `${vdi.id}.g0.qcow2`],
        'generation 0 and its block digests, nothing of the failed conversion',
      );
      await assertNotWedged(vdi.id, t.task_id, freeBefore);
    } finally {
      await teardown();
    }
  });

  test('create and resize on a full SR: qcow2 refused with 507 leaving no file, raw (no data) still created, resize refused', async () => {
    await smallServer();
    try {
      const qcow = await createVdi(srv.url, 64 * MiB, { image_format: 'qcow2' });
      const sr = path.join(srv.dataDir, 'srs', 'local');
      const before = (await fsp.readdir(sr)).sort();
      // Someone else fills the disk (outside diskport's directories) down to half the reserve.
      const filler = await fs.fill(RESERVE / 2);
      // The SR's guard trusts what it learned of the disk for this long.
      await sleep(SPACE_RECHECK_INTERVAL_MS + 1);
      const created = await api(srv.url, 'POST', '/v1/vdis', {
        name_label: 'no room',
        virtual_size: 8 * 1024 * MiB,
        image_format: 'qcow2',
      });
      assert.equal(created.status, 507, JSON.stringify(created.body));
      assertSpaceError(created.body, 'qcow2 create');
      assert.deepEqual((await fsp.readdir(sr)).sort(), before, 'a failed create leaves no file');
      // A raw VDI stores no byte until written: its metadata fits in the reserve.
      const raw = await api<{ id: string }>(srv.url, 'POST', '/v1/vdis', {
        name_label: 'thin',
        virtual_size: 16 * MiB,
      });
      assert.equal(raw.status, 201, JSON.stringify(raw.body));
      const resized = await api(srv.url, 'PATCH', `/v1/vdis/${qcow.id}`, { virtual_size: 4 * 1024 * MiB });
      assert.equal(resized.status, 507, JSON.stringify(resized.body));
      assertSpaceError(resized.body, 'qcow2 resize');
      assert.deepEqual(await fsp.readdir(stagingDir()), []);
      const after = await api<{ virtual_size: number; generation: number }>(
        srv.url,
        'GET',
        `/v1/vdis/${qcow.id}`,
      );
      assert.equal(after.body.virtual_size, 64 * MiB);
      assert.equal(after.body.generation, 0);
      // Space back: the same requests succeed.
      await fsp.rm(filler);
      assert.equal(
        (await api(srv.url, 'PATCH', `/v1/vdis/${qcow.id}`, { virtual_size: 4 * 1024 * MiB })).status,
        200,
      );
      const later = await createVdi(srv.url, 8 * 1024 * MiB, { image_format: 'qcow2' });
      assert.ok(later.id);
    } finally {
      await teardown();
    }
  });

  test('a server killed while an upload filled the disk starts again on the full disk: staging freed first, task INTERRUPTED', async () => {
    const tmp = await mountTmpfs(FS_MIB);
    const dataDir = path.join(tmp.dir, 'data');
    const args = ['--space-reserve', String(RESERVE)];
    let server = await spawnServer(dataDir, args);
    try {
      const vdi = await createVdi(server.url, 128 * MiB);
      const staging = path.join(dataDir, 'srs', 'local', '.staging');
      // A one-shot PUT that sends 40 MiB, then nothing more: its staging holds them when the server dies.
      const data = seededBytes(40 * MiB, 13);
      let sent = false;
      const body = new ReadableStream<Uint8Array>({
        pull(c) {
          if (sent) return new Promise(() => {}); // the client goes silent
          sent = true;
          for (let at = 0; at < data.length; at += MiB)
            c.enqueue(new Uint8Array(data.subarray(at, at + MiB)));
        },
      });
      const put = fetch(`${server.url}/v1/vdis/${vdi.id}/contents?format=raw`, {
        method: 'PUT',
        body,
        duplex: 'half',
      } as RequestInit).catch(() => null);
      const stagedBytes = async () => {
        let n = 0;
        for (const f of await fsp.readdir(staging)) n += (await fsp.stat(path.join(staging, f))).blocks * 512;
        return n;
      };
      for (let i = 0; (await stagedBytes()) < 36 * MiB; i++) {
        assert.ok(i < 600, 'the upload never landed');
        await sleep(50);
      }
      await server.stop('SIGKILL');
      await put;
      // Then the disk fills to the last byte (what a full disk looked like before the reserve).
      const filler = await tmp.fill(0);
      assert.ok((await tmp.free()) < 64 * 1024);

      server = await spawnServer(dataDir, args);
      assert.equal((await fetch(`${server.url}/healthz`)).status, 200);
      assert.deepEqual(await fsp.readdir(staging), [], 'the dead upload was freed first');
      const tasks = await api<Task[]>(server.url, 'GET', `/v1/tasks?vdi=${vdi.id}&type=import`);
      assert.equal(tasks.body[0].status, 'failure');
      assert.equal(tasks.body[0].error?.code, 'INTERRUPTED');
      assert.ok((await fsp.stat(filler)).size > 0, "someone else's file is left alone");
      const small = await fetch(`${server.url}/v1/vdis/${vdi.id}/contents?format=raw`, {
        method: 'PUT',
        body: new Uint8Array(seededBytes(MiB, 1)),
      });
      assert.equal(small.status, 200, await small.text());
    } finally {
      await server.stop('SIGKILL');
      await tmp.unmount();
    }
  });
});
