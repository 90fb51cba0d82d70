/**
 * What diskport leaves on disk: files only its user reads (0600, directories
 * 0700), a start-up cleanup that removes only the files diskport names itself,
 * and the limits of the SR's file system (a loop-mounted ext4 holds no file
 * of 16 TiB: a raw VDI that large is refused at create).
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { api, createVdi, execFileP, type JsonResponse, type TransferJson } from './helpers/api.js';
import { TEST_DATABASE_URL } from './helpers/pg.js';
import { seededBytes, startServer, type TestServer, tempDir } from './helpers/server.js';
import { cannotMount, mountExt4 } from './helpers/small-fs.js';

const MiB = 1024 * 1024;
const TiB = 1024 ** 4;
type ErrorBody = { error: { code: string; message: string; details?: Record<string, unknown> } };

/** Every file and directory under `dir`, with its permission bits. */
async function modes(dir: string): Promise<{ file: string; mode: number; isDir: boolean }[]> {
  const out: { file: string; mode: number; isDir: boolean }[] = [];
  for (const entry of await fsp.readdir(dir, { withFileTypes: true })) {
    const file = path.join(dir, entry.name);
    const st = await fsp.stat(file).catch(() => null);
    if (!st) continue; // removed meanwhile (an old generation being unlinked)
    out.push({ file, mode: st.mode & 0o777, isDir: entry.isDirectory() });
    if (entry.isDirectory()) out.push(...(await modes(file)));
  }
  return out;
}

function assertPrivate(entries: { file: string; mode: number; isDir: boolean }[], root: string): void {
  for (const e of entries) {
    const want = e.isDir ? 0o700 : 0o600;
    assert.equal(
      e.mode,
      want,
      `${path.relative(root, e.file)} is ${e.mode.toString(8)}, not ${want.toString(8)}`,
    );
  }
}

describe('files at rest', () => {
  const dirs: string[] = [];
  after(async () => {
    for (const d of dirs) await fsp.rm(d, { recursive: true, force: true });
  });

  test('the database, images and staging files are created 0600, directories 0700, whatever the umask', async () => {
    const dataDir = path.join(await tempDir(), 'data');
    dirs.push(path.dirname(dataDir));
    const umask = process.umask(0o022); // the usual one, which makes files world-readable
    let srv: TestServer | null = null;
    try {
      srv = await startServer({ dataDir });
      const raw = await createVdi(srv.url, 8 * MiB);
      const vhd = await createVdi(srv.url, 8 * MiB, { image_format: 'vhd' });
      const qcow2 = await createVdi(srv.url, 8 * MiB, { image_format: 'qcow2' });
      const data = seededBytes(2 * MiB, 4);
      // A session left open: its staging file.
      const open = (
        await api<TransferJson>(srv.url, 'POST', '/v1/transfers', {
          vdi: raw.id,
          direction: 'upload',
          format: 'raw',
          size: 8 * MiB,
        })
      ).body;
      const chunk = await fetch(open.url, {
        method: 'PUT',
        headers: { 'content-range': `bytes 0-${data.length - 1}/${8 * MiB}` },
        body: new Uint8Array(data),
      });
      assert.equal(chunk.status, 200);
      // Imports: a link (same format), a conversion (raw into qcow2), a qcow2 streamed into a raw disk.
      for (const [vdi, format] of [
        [vhd.id, 'raw'],
        [qcow2.id, 'raw'],
      ] as const) {
        const put: Response = await fetch(`${srv.url}/v1/vdis/${vdi}/contents?format=${format}`, {
          method: 'PUT',
          body: new Uint8Array(data),
        });
        assert.equal(put.status, 200, await put.text());
      }
      const qcowBytes = await fetch(`${srv.url}/v1/vdis/${qcow2.id}/contents?format=qcow2`);
      const other = await createVdi(srv.url, 8 * MiB);
      const streamed = await fetch(`${srv.url}/v1/vdis/${other.id}/contents?format=qcow2`, {
        method: 'PUT',
        body: new Uint8Array(await qcowBytes.arrayBuffer()),
      });
      assert.equal(streamed.status, 200, await streamed.text());
      const grown = await api(srv.url, 'PATCH', `/v1/vdis/${qcow2.id}`, { virtual_size: 16 * MiB });
      assert.equal(grown.status, 200);

      const entries = await modes(dataDir);
      // SQLite's file is among them (the PostgreSQL pass keeps the metadata elsewhere).
      assert.equal(
        entries.some((e) => e.file.endsWith('diskport.sqlite')),
        !TEST_DATABASE_URL,
      );
      assert.ok(entries.some((e) => e.file.includes(`${path.sep}.staging${path.sep}transfer-${open.id}`)));
      assert.ok(entries.filter((e) => /\.g\d+\.(raw|vhd|qcow2)$/.test(e.file)).length >= 4);
      assertPrivate(entries, dataDir);
      assert.equal((await fsp.stat(dataDir)).mode & 0o777, 0o700);
      await srv.close();
      srv = null;

      // An SQLite database an earlier version left world-readable is made private at start-up.
      for (const f of ['diskport.sqlite', 'diskport.sqlite-wal']) {
        await fsp.chmod(path.join(dataDir, f), 0o644).catch(() => {});
      }
      srv = await startServer({ dataDir });
      for (const f of ['diskport.sqlite', 'diskport.sqlite-wal', 'diskport.sqlite-shm']) {
        const st = await fsp.stat(path.join(dataDir, f)).catch(() => null);
        if (st) assert.equal(st.mode & 0o777, 0o600, f);
      }
    } finally {
      await srv?.close();
      process.umask(umask);
    }
  });

  test('start-up cleanup removes only the files diskport names itself', async () => {
    const dataDir = await tempDir();
    dirs.push(dataDir);
    let srv = await startServer({ dataDir });
    const vdi = await createVdi(srv.url, 4 * MiB);
    await srv.close();

    const sr = path.join(dataDir, 'srs', 'local');
    const staging = path.join(sr, '.staging');
    const theirs = [
      path.join(sr, 'lost+found', 'inode-1234'),
      path.join(sr, 'notes.txt'),
      path.join(sr, `${vdi.id}.backup`),
      path.join(sr, 'disk.g1.raw'),
      path.join(staging, 'keep-me.bin'),
      path.join(staging, 'transfer-not-a-uuid.raw'),
    ];
    const ours = [
      path.join(sr, `${randomUUID()}.g3.raw`), // a generation no VDI points at
      path.join(sr, `${vdi.id}.g7.qcow2`), // a later generation of a live VDI, never committed
      path.join(staging, `transfer-${randomUUID()}.qcow2`),
      path.join(staging, `transfer-${randomUUID()}.vhd.raw.2`),
      path.join(staging, `transfer-${randomUUID()}.raw.chunk-${randomUUID()}`),
      path.join(staging, `resize-${randomUUID()}`),
      path.join(staging, `probe-${randomUUID()}`),
    ];
    for (const f of [...theirs, ...ours]) {
      await fsp.mkdir(path.dirname(f), { recursive: true });
      await fsp.writeFile(f, 'x');
    }
    srv = await startServer({ dataDir });
    try {
      for (const f of theirs)
        assert.ok(await fsp.stat(f).catch(() => null), `${path.relative(sr, f)} was kept`);
      for (const f of ours)
        assert.equal(await fsp.stat(f).catch(() => null), null, `${path.relative(sr, f)} was removed`);
      assert.ok(await fsp.stat(path.join(sr, `${vdi.id}.g0.raw`)), "the VDI's own file stays");
      assert.equal(
        (await api(srv.url, 'GET', `/v1/vdis/${vdi.id}/contents`, undefined, { range: 'bytes=0-0' })).status,
        206,
      );
    } finally {
      await srv.close();
    }
  });
});

const skip = await cannotMount();

describe('an SR on its own ext4 file system', { skip: skip ?? false }, () => {
  test('keeps lost+found at start-up; a raw VDI larger than ext4 holds (16 TiB) is refused at create and resize, leaving nothing', async () => {
    const dataDir = await tempDir();
    const sr = path.join(dataDir, 'srs', 'local');
    await fsp.mkdir(sr, { recursive: true });
    const ext4 = await mountExt4(64, sr);
    let srv: TestServer | null = null;
    try {
      assert.ok(await fsp.stat(path.join(sr, 'lost+found')), 'mkfs made lost+found');
      srv = await startServer({ dataDir });
      await srv.close();
      srv = await startServer({ dataDir });
      assert.ok(await fsp.stat(path.join(sr, 'lost+found')), 'lost+found survives start-ups');

      const before = (await fsp.readdir(sr)).sort();
      for (const size of [17 * TiB, 16 * TiB]) {
        const res: JsonResponse<ErrorBody> = await api<ErrorBody>(srv.url, 'POST', '/v1/vdis', {
          name_label: 'huge',
          virtual_size: size,
        });
        assert.equal(res.status, 400, JSON.stringify(res.body));
        assert.match(res.body.error.message, /file system holds files of at most 16 TiB/);
        assert.equal(res.body.error.details?.max_file_size, 16 * TiB - 4096);
      }
      assert.deepEqual((await fsp.readdir(sr)).sort(), before, 'a refused create leaves no file');
      assert.deepEqual(await fsp.readdir(path.join(sr, '.staging')), []);

      // Below the limit a raw VDI is a sparse file; qcow2 grows with its data, so any size fits.
      const raw = await createVdi(srv.url, 15 * TiB);
      const qcow2 = await createVdi(srv.url, 17 * TiB, { image_format: 'qcow2' });
      const info = JSON.parse(
        (await execFileP('qemu-img', ['info', '--output=json', path.join(sr, `${qcow2.id}.g0.qcow2`)]))
          .stdout,
      );
      assert.equal(info['virtual-size'], 17 * TiB);
      const grow = await api<ErrorBody>(srv.url, 'PATCH', `/v1/vdis/${raw.id}`, { virtual_size: 17 * TiB });
      assert.equal(grow.status, 400, JSON.stringify(grow.body));
      assert.match(grow.body.error.message, /at most 16 TiB/);
      assert.equal(
        (await api<{ virtual_size: number }>(srv.url, 'GET', `/v1/vdis/${raw.id}`)).body.virtual_size,
        15 * TiB,
      );
    } finally {
      await srv?.close();
      await ext4.unmount();
      await fsp.rm(dataDir, { recursive: true, force: true });
    }
  });
});
