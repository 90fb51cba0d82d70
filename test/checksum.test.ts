import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { Extent } from '../src/image/block-image.js';
import { MemoryImage } from '../src/image/memory-image.js';
import { ASYNC_DATA_THRESHOLD_BYTES, hashImage } from '../src/ops/checksum.js';
import { api, createVdi, curl, execFileP } from './helpers/api.js';
import { seededBytes, startServer, type TestServer, tempDir } from './helpers/server.js';

const MiB = 1024 * 1024;

interface Checksum {
  algorithm: string;
  checksum: string;
  virtual_size: number;
  generation: number;
}

interface Task {
  id: string;
  type: string;
  status: string;
  progress: number;
  bytes_done: number;
  result: Checksum | null;
}

async function coreutilsSum(tool: string, file: string): Promise<string> {
  const { stdout } = await execFileP(tool, [file]);
  return stdout.toString().split(' ')[0];
}

/** A raw image with scattered data and holes (some of them longer than the hash chunk). */
async function writeSparseImage(file: string, size: number, seed: number): Promise<void> {
  const h = await fsp.open(file, 'w');
  await h.truncate(size);
  for (const [i, at] of [0, 5 * MiB + 123, 13 * MiB, size - 4096].entries()) {
    const data = seededBytes(Math.min(300 * 1024, size - at), seed + i);
    await h.write(data, 0, data.length, at);
  }
  await h.close();
}

async function importRaw(base: string, vdi: string, file: string): Promise<void> {
  const task = JSON.parse(
    (await curl(['-T', file, `${base}/v1/vdis/${vdi}/contents?format=raw`])).toString(),
  );
  assert.equal(task.status, 'success');
}

describe('GET /v1/vdis/{vdi}/checksum', () => {
  const size = 24 * MiB;
  let srv: TestServer;
  let dir: string;
  let image: string;
  let vdiId: string;
  before(async () => {
    srv = await startServer();
    dir = await tempDir();
    image = path.join(dir, 'disk.raw');
    await writeSparseImage(image, size, 7);
    vdiId = (await createVdi(srv.url, size)).id;
    await importRaw(srv.url, vdiId, image);
  });
  after(async () => {
    await srv.close();
    await fsp.rm(dir, { recursive: true, force: true });
  });

  test('sha256 (the default), sha1 and md5 equal sha256sum, sha1sum and md5sum of the imported file', async () => {
    for (const [algorithm, tool] of [
      ['sha256', 'sha256sum'],
      ['sha1', 'sha1sum'],
      ['md5', 'md5sum'],
    ]) {
      const res = await api<Checksum>(srv.url, 'GET', `/v1/vdis/${vdiId}/checksum?algorithm=${algorithm}`);
      assert.equal(res.status, 200, JSON.stringify(res.body));
      assert.equal(res.body.algorithm, algorithm);
      assert.equal(res.body.checksum, await coreutilsSum(tool, image), `${algorithm} matches ${tool}`);
      assert.equal(res.body.virtual_size, size);
      assert.equal(res.body.generation, 1);
    }
    const byDefault = await api<Checksum>(srv.url, 'GET', `/v1/vdis/${vdiId}/checksum`);
    assert.equal(byDefault.body.algorithm, 'sha256');
    assert.equal(byDefault.body.checksum, await coreutilsSum('sha256sum', image));
  });

  test('the same disk gives one sha256 whatever format it came in or is stored in, equal to sha256sum', async () => {
    const expected = await coreutilsSum('sha256sum', image);
    await execFileP('qemu-img', ['convert', '-f', 'raw', '-O', 'vpc', image, `${image}.vhd`]);
    await execFileP('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-c', image, `${image}.qcow2`]);
    const cases: [string, string, string][] = [
      ['vhd', `${image}.vhd`, 'raw'],
      ['qcow2', `${image}.qcow2`, 'raw'],
      ['raw', image, 'vhd'],
      ['qcow2', `${image}.qcow2`, 'qcow2'],
    ];
    for (const [wire, file, atRest] of cases) {
      const vdi = (await createVdi(srv.url, size, { image_format: atRest })).id;
      const task = JSON.parse(
        (await curl(['-T', file, `${srv.url}/v1/vdis/${vdi}/contents?format=${wire}`])).toString(),
      );
      assert.equal(task.status, 'success');
      const res = await api<Checksum>(srv.url, 'GET', `/v1/vdis/${vdi}/checksum?algorithm=sha256`);
      assert.equal(res.body.checksum, expected, `imported as ${wire}, stored as ${atRest}`);
    }
  });

  test('the second request is a cache hit; a new import changes the value and the generation', async () => {
    const url = `/v1/vdis/${vdiId}/checksum?algorithm=sha256`;
    const first = await api<Checksum>(srv.url, 'GET', url);
    const second = await api<Checksum>(srv.url, 'GET', url);
    assert.match(second.headers.get('cache-status') ?? '', /; hit/);
    assert.deepEqual(second.body, first.body);

    const other = path.join(dir, 'other.raw');
    await writeSparseImage(other, size, 99);
    await importRaw(srv.url, vdiId, other);
    const after = await api<Checksum>(srv.url, 'GET', url);
    assert.doesNotMatch(after.headers.get('cache-status') ?? '', /; hit/);
    assert.equal(after.body.generation, first.body.generation + 1);
    assert.notEqual(after.body.checksum, first.body.checksum);
    assert.equal(after.body.checksum, await coreutilsSum('sha256sum', other));
    await importRaw(srv.url, vdiId, image); // back to the content the other tests expect
  });

  test('an all-hole disk hashes as that many zeros', async () => {
    const empty = await createVdi(srv.url, 40 * MiB);
    const res = await api<Checksum>(srv.url, 'GET', `/v1/vdis/${empty.id}/checksum?algorithm=md5`);
    const zeros = path.join(dir, 'zeros.raw');
    await fsp.writeFile(zeros, Buffer.alloc(40 * MiB));
    assert.equal(res.body.checksum, await coreutilsSum('md5sum', zeros));
  });

  test('with async=true it runs as a checksum task: 202, Location, and the task ends with the same value', async () => {
    assert.ok(
      ASYNC_DATA_THRESHOLD_BYTES > size,
      'this disk is small enough to be answered inline by default',
    );
    // A VDI of its own, so no earlier request has cached its checksum.
    const fresh = (await createVdi(srv.url, size)).id;
    await importRaw(srv.url, fresh, image);
    const started = await api<Task>(srv.url, 'GET', `/v1/vdis/${fresh}/checksum?algorithm=sha256&async=true`);
    assert.equal(started.status, 202, JSON.stringify(started.body));
    assert.equal(started.headers.get('location'), `/v1/tasks/${started.body.id}`);
    assert.equal(started.body.type, 'checksum');

    const done = await api<Task>(srv.url, 'GET', `/v1/tasks/${started.body.id}?wait=30`);
    assert.equal(done.body.status, 'success', JSON.stringify(done.body));
    assert.equal(done.body.progress, 1);
    assert.equal(done.body.bytes_done, size, 'progress counts every byte hashed, holes included');
    assert.deepEqual(done.body.result, {
      algorithm: 'sha256',
      checksum: await coreutilsSum('sha256sum', image),
      virtual_size: size,
      generation: 1,
    });
    const after = await api<Checksum>(srv.url, 'GET', `/v1/vdis/${fresh}/checksum?algorithm=sha256`);
    assert.equal(after.status, 200, 'the task filled the cache');
    assert.match(after.headers.get('cache-status') ?? '', /; hit/);
    assert.equal(after.body.checksum, done.body.result?.checksum);
  });

  test('an unknown algorithm is 400 naming the allowed ones; an unknown VDI 404', async () => {
    const bad = await api<{ error: { code: string; message: string } }>(
      srv.url,
      'GET',
      `/v1/vdis/${vdiId}/checksum?algorithm=crc32`,
    );
    assert.equal(bad.status, 400);
    assert.equal(bad.body.error.code, 'UNSUPPORTED_CHECKSUM_ALGORITHM');
    assert.match(bad.body.error.message, /sha256, sha1, md5/);
    const badAsync = await api(srv.url, 'GET', `/v1/vdis/${vdiId}/checksum?async=maybe`);
    assert.equal(badAsync.status, 400);
    const missing = await api<{ error: { code: string } }>(srv.url, 'GET', '/v1/vdis/nope/checksum');
    assert.equal(missing.status, 404);
  });
});

describe('checksum tasks: cancel and shutdown', () => {
  const GiB = 1024 * MiB;

  test('a running checksum task can be cancelled', async () => {
    const srv = await startServer();
    try {
      const vdi = await createVdi(srv.url, 4 * GiB);
      const started = await api<Task>(srv.url, 'GET', `/v1/vdis/${vdi.id}/checksum?algorithm=md5&async=true`);
      assert.equal(started.status, 202);
      const cancel = await api<Task>(srv.url, 'POST', `/v1/tasks/${started.body.id}/cancel`);
      assert.equal(cancel.status, 202);
      const done = await api<Task>(srv.url, 'GET', `/v1/tasks/${started.body.id}?wait=30`);
      assert.equal(done.body.status, 'cancelled');
      assert.ok(done.body.bytes_done < 4 * GiB);
      const again = await api<Task>(srv.url, 'GET', `/v1/vdis/${vdi.id}/checksum?algorithm=md5&async=true`);
      assert.equal(again.status, 202, 'a cancelled checksum leaves nothing in the cache');
      await api(srv.url, 'POST', `/v1/tasks/${again.body.id}/cancel`);
    } finally {
      await srv.close();
    }
  });

  test('a checksum task running when the service stops is recorded as interrupted at restart', async () => {
    const srv = await startServer();
    const vdi = await createVdi(srv.url, 4 * GiB);
    const started = await api<Task>(srv.url, 'GET', `/v1/vdis/${vdi.id}/checksum?async=true`);
    assert.equal(started.status, 202);
    await srv.close();
    const again = await startServer({ dataDir: srv.dataDir });
    try {
      const task = await api<Task & { error: { code: string } }>(
        again.url,
        'GET',
        `/v1/tasks/${started.body.id}`,
      );
      assert.equal(task.body.status, 'failure');
      assert.equal(task.body.error.code, 'INTERRUPTED');
    } finally {
      await again.close();
      await fsp.rm(srv.dataDir, { recursive: true, force: true });
    }
  });
});

describe('hashImage', () => {
  /** An in-memory disk that records what is read from it. */
  class CountingImage extends MemoryImage {
    bytesRead = 0;
    override readInto(buf: Buffer, offset: number): Promise<Buffer> {
      this.bytesRead += buf.length;
      return super.readInto(buf, offset);
    }
  }

  async function memoryImage(bytes: Buffer, extents: Extent[]): Promise<CountingImage> {
    const image = new CountingImage(bytes.length, MiB);
    for (const e of extents)
      if (!e.zero) await image.write(e.start, bytes.subarray(e.start, e.start + e.length));
    assert.deepEqual(await image.extents(), extents);
    return image;
  }

  test('reads only the data extents and hashes holes as zeros', async () => {
    const bytes = Buffer.alloc(20 * MiB);
    seededBytes(MiB, 1).copy(bytes, 0);
    seededBytes(3 * MiB, 2).copy(bytes, 12 * MiB);
    const extents = [
      { start: 0, length: MiB, zero: false },
      { start: MiB, length: 11 * MiB, zero: true },
      { start: 12 * MiB, length: 3 * MiB, zero: false },
      { start: 15 * MiB, length: 5 * MiB, zero: true },
    ];
    const image = await memoryImage(bytes, extents);
    let hashed = 0;
    const digest = await hashImage(image, extents, 'sha256', { onBytes: (n) => (hashed += n) });
    assert.equal(digest, createHash('sha256').update(bytes).digest('hex'));
    assert.equal(image.bytesRead, 4 * MiB, 'holes are never read');
    assert.equal(hashed, 20 * MiB, 'progress counts holes too');
  });

  test('stops when its signal is aborted', async () => {
    const image = await memoryImage(Buffer.alloc(64 * MiB), [{ start: 0, length: 64 * MiB, zero: true }]);
    const ac = new AbortController();
    let hashed = 0;
    const run = hashImage(image, await image.extents(), 'md5', {
      signal: ac.signal,
      onBytes: (n) => {
        hashed += n;
        if (hashed >= 8 * MiB) ac.abort(new Error('stop'));
      },
    });
    await assert.rejects(run, /stop/);
    assert.ok(hashed < 64 * MiB);
  });
});
