/**
 * A qcow2 VDI whose file is damaged at rest (a compressed cluster that now
 * inflates to 1000 bytes, not a cluster) is read by every read path: each
 * export format, ranges, HEAD, the xapi alias, a download session,
 * checksums, a resize (a conversion) and pushes to a second diskport. None
 * may end the process: a read that fails before its first byte answers a
 * JSON error, one that fails mid-stream cuts the connection (a short body,
 * never a wrong one), logs the cause and fails its task. After each, the
 * server answers /healthz and serves a healthy VDI's bytes.
 *
 * The client reads slowly, so the server is waiting for the socket to drain
 * while its read ahead of the damaged cluster fails: that rejection,
 * unobserved, used to be an unhandled one, and ended the process.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { promises as fsp, readFileSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { deflateRawSync } from 'node:zlib';
import { api, createVdi, type TransferJson } from './helpers/api.js';
import { prng, seededBytes } from './helpers/random.js';
import { type ServerProcess, spawnServer, startServer, type TestServer, tempDir } from './helpers/server.js';

const MiB = 1024 * 1024;
const DISK_BYTES = 64 * MiB;
const SMALL_DISK_BYTES = 4 * MiB;
const CLUSTER_BYTES = 64 * 1024;
/**
 * Where the damage is: past what the socket buffers hold, so the server,
 * reading plain clusters far faster than the client takes them, is waiting
 * for the socket to drain when it gets there.
 */
const DEEP_DAMAGE_AT = 24 * MiB;
const READ_BYTES_PER_SECOND = 8 * MiB;

type ErrorBody = { error: { code: string; message: string } };
type Task = { id: string; status: string; error: { code: string; message: string } | null };

/**
 * The disk: random (incompressible) bytes up to DEEP_DAMAGE_AT, which
 * `qemu-img convert -c` stores as plain clusters that read fast, then
 * low-entropy data in most clusters, which it compresses.
 */
function makeSource(): Buffer {
  const disk = seededBytes(DISK_BYTES, 17);
  const rand = prng(18);
  for (let c = DEEP_DAMAGE_AT; c < DISK_BYTES; c += CLUSTER_BYTES) {
    disk.fill(0, c, c + CLUSTER_BYTES);
    if (c > DEEP_DAMAGE_AT && rand() < 0.3) continue;
    for (let i = 0; i < CLUSTER_BYTES; i += 256) disk.fill(97 + Math.floor(rand() * 4), c + i, c + i + 16);
  }
  return disk;
}

/** A small disk whose every cluster compresses, the first one included. */
function makeSmallSource(): Buffer {
  const disk = Buffer.alloc(SMALL_DISK_BYTES);
  for (let i = 0; i < SMALL_DISK_BYTES; i += 256) disk.fill(97 + ((i >> 8) % 4), i, i + 16);
  return disk;
}

/** The disk as `qemu-img convert -c` writes it into a qcow2 (64 KiB clusters). */
function compressedQcow2(dir: string, name: string, disk: Buffer): Buffer {
  const raw = path.join(dir, `${name}.raw`);
  const qcow2 = path.join(dir, `${name}.qcow2`);
  writeFileSync(raw, disk);
  execFileSync('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', raw, qcow2]);
  return readFileSync(qcow2);
}

/** Guest offset -> file offset of each compressed cluster of a qcow2 file (64 KiB clusters, one L2 table). */
function compressedClusters(img: Buffer): Map<number, number> {
  const l1 = Number(img.readBigUInt64BE(40));
  const l2 = Number(img.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
  const found = new Map<number, number>();
  for (let j = 0; j < DISK_BYTES / CLUSTER_BYTES; j++) {
    const entry = img.readBigUInt64BE(l2 + j * 8);
    // 64 KiB clusters: the host offset is bits 0..53 of a compressed descriptor.
    if (entry & (1n << 62n)) found.set(j * CLUSTER_BYTES, Number(entry & ((1n << 54n) - 1n)));
  }
  return found;
}

/**
 * GETs `url` reading at most READ_BYTES_PER_SECOND; resolves when the
 * connection ends, however it ends. The server outpaces it, so its socket
 * stays full and it waits for the client at every chunk.
 */
function slowGet(url: string, headers: Record<string, string> = {}) {
  return new Promise<{ status: number; headers: http.IncomingHttpHeaders; body: Buffer }>(
    (resolve, reject) => {
      http
        .get(url, { headers }, (res) => {
          const parts: Buffer[] = [];
          res.on('data', (chunk: Buffer) => {
            parts.push(chunk);
            res.pause();
            setTimeout(() => res.resume(), (chunk.length / READ_BYTES_PER_SECOND) * 1000);
          });
          res.on('error', () => {}); // a cut connection: 'close' follows
          res.on('close', () =>
            resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(parts) }),
          );
        })
        .on('error', reject);
    },
  );
}

describe('an image damaged at rest never takes the server down', () => {
  let dir: string;
  let a: ServerProcess;
  let b: TestServer;
  let source: Buffer;
  let qcow2: Buffer;
  let small: Buffer;
  const logLines: string[] = [];
  /** VDIs on A: the image as uploaded, damaged deep inside; a small one damaged in its first cluster. */
  let healthy: string;
  let damaged: string;
  let damagedFirst: string;
  /** The exports of the healthy VDI, byte for byte what the damaged one's must begin with. */
  const reference = new Map<string, Buffer>();

  const fileOf = async (vdi: string) => {
    const sr = path.join(dir, 'a', 'srs', 'local');
    const name = (await fsp.readdir(sr)).find((f) => f.startsWith(vdi) && !f.endsWith('.digests'));
    assert.ok(name, `no file for VDI ${vdi}`);
    return path.join(sr, name);
  };
  /**
   * Puts `image` (a compressed qcow2 of the VDI's disk) in place of the
   * VDI's file, with the cluster at `guestOffset` damaged: diskport never
   * stores a compressed cluster itself (it rewrites what it imports), so the
   * damage comes from outside, as it would at rest.
   */
  const damage = async (vdi: string, image: Buffer, guestOffset: number) => {
    const file = await fileOf(vdi);
    const img = Buffer.from(image);
    const host = compressedClusters(img).get(guestOffset);
    assert.ok(host !== undefined, `guest cluster ${guestOffset} is not compressed`);
    // A valid deflate stream of the wrong length: qemu reads this cluster as corrupt too.
    deflateRawSync(Buffer.alloc(1000, 0x5a)).copy(img, host);
    await fsp.writeFile(`${file}.damaged`, img);
    await fsp.rename(`${file}.damaged`, file);
  };
  const qcow2Vdi = async (image: Buffer, size: number) => {
    const vdi = await createVdi(a.url, size, { image_format: 'qcow2' });
    const res = await fetch(`${a.url}/v1/vdis/${vdi.id}/contents?format=qcow2`, {
      method: 'PUT',
      body: new Uint8Array(image),
    });
    assert.equal(res.status, 200, await res.text());
    return vdi.id;
  };

  /** The process lives, /healthz answers, and a healthy VDI still reads right. */
  const assertHealthy = async () => {
    assert.equal(a.child.exitCode, null, 'the server process ended');
    assert.equal((await fetch(`${a.url}/healthz`)).status, 200);
    const res = await fetch(`${a.url}/v1/vdis/${healthy}/contents?format=raw`, {
      headers: { range: `bytes=${DEEP_DAMAGE_AT}-${DEEP_DAMAGE_AT + MiB - 1}` },
    });
    assert.equal(res.status, 206);
    assert.ok(
      Buffer.from(await res.arrayBuffer()).equals(source.subarray(DEEP_DAMAGE_AT, DEEP_DAMAGE_AT + MiB)),
    );
  };
  const waitTask = async (id: string) => {
    for (let i = 0; ; i++) {
      const res = await api<Task>(a.url, 'GET', `/v1/tasks/${id}?wait=5`);
      if (!['pending', 'running'].includes(res.body.status)) return res.body;
      assert.ok(i < 12, `task still running after a minute: ${JSON.stringify(res.body)}`);
    }
  };
  /** A body cut short: the start of what the healthy VDI serves, and less than announced. */
  const assertShortPrefix = (got: { headers: http.IncomingHttpHeaders; body: Buffer }, expected: Buffer) => {
    assert.ok(
      got.body.length < Number(got.headers['content-length']),
      `${got.body.length} of ${got.headers['content-length']} bytes: not cut short`,
    );
    assert.ok(got.body.equals(expected.subarray(0, got.body.length)), 'the bytes sent are not the disk');
  };
  const assertCorruptError = (status: number, body: unknown) => {
    assert.equal(status, 500, JSON.stringify(body));
    assert.equal((body as ErrorBody).error.code, 'IMAGE_CORRUPT');
    assert.doesNotMatch((body as ErrorBody).error.message, /inflate|\/srs\//, 'internal detail leaked');
  };

  before(async () => {
    dir = await tempDir('diskport-corrupt-');
    source = makeSource();
    qcow2 = compressedQcow2(dir, 'source', source);
    small = compressedQcow2(dir, 'small', makeSmallSource());
    const clusters = [...compressedClusters(qcow2).keys()].sort((x, y) => x - y);
    assert.equal(clusters[0], DEEP_DAMAGE_AT, 'the disk is plain clusters up to the damage');

    [a, b] = await Promise.all([
      spawnServer(path.join(dir, 'a'), ['--allow-fetch', '127.0.0.0/8']),
      startServer({ dataDir: path.join(dir, 'b') }),
    ]);
    a.child.stdout?.on('data', (d) => logLines.push(...String(d).split('\n')));
    healthy = await qcow2Vdi(qcow2, DISK_BYTES);
    damaged = await qcow2Vdi(qcow2, DISK_BYTES);
    damagedFirst = await qcow2Vdi(small, SMALL_DISK_BYTES);
    await damage(damaged, qcow2, DEEP_DAMAGE_AT);
    await damage(damagedFirst, small, 0);
    // qemu agrees: it cannot read the damaged file either.
    const judge = path.join(dir, 'judge.raw');
    const damagedFile = await fileOf(damaged);
    assert.throws(() =>
      execFileSync('qemu-img', ['convert', '-O', 'raw', damagedFile, judge], { stdio: 'pipe' }),
    );
    for (const format of ['raw', 'vhd', 'qcow2']) {
      const res = await fetch(`${a.url}/v1/vdis/${healthy}/contents?format=${format}`);
      assert.equal(res.status, 200);
      reference.set(format, Buffer.from(await res.arrayBuffer()));
    }
    assert.ok(reference.get('raw')?.equals(source));
  });
  after(async () => {
    await Promise.all([a?.stop(), b?.close()]);
    await fsp.rm(dir, { recursive: true, force: true });
  });

  for (const format of ['raw', 'vhd', 'qcow2']) {
    test(`a ${format} export is cut short mid-stream, its task fails with IMAGE_CORRUPT, the cause is logged`, async () => {
      const got = await slowGet(`${a.url}/v1/vdis/${damaged}/contents?format=${format}`);
      assert.equal(got.status, 200);
      assertShortPrefix(got, reference.get(format) as Buffer);
      const task = await waitTask(String(got.headers['x-task-id']));
      assert.equal(task.status, 'failure');
      assert.equal(task.error?.code, 'IMAGE_CORRUPT');
      await assertHealthy();
      assert.ok(
        logLines.some((l) => l.includes('export failed mid-stream') && l.includes('inflates to 1000 bytes')),
        'the cause is not in the log',
      );
    });
  }

  test('an export damaged in its first bytes answers a JSON error, not a 200, and fails its task', async () => {
    const ranged = await fetch(`${a.url}/v1/vdis/${damagedFirst}/contents?format=raw`, {
      headers: { range: 'bytes=0-' },
    });
    assert.equal(ranged.headers.get('content-type')?.split(';')[0], 'application/json');
    assert.equal(ranged.headers.get('content-range'), null);
    assertCorruptError(ranged.status, await ranged.json());
    const whole = await fetch(`${a.url}/v1/vdis/${damagedFirst}/contents?format=raw`);
    assert.equal(whole.headers.get('content-disposition'), null);
    assertCorruptError(whole.status, await whole.json());
    const task = await waitTask(String(whole.headers.get('x-task-id')));
    assert.equal(task.status, 'failure');
    assert.equal(task.error?.code, 'IMAGE_CORRUPT');
    await assertHealthy();
  });

  test('ranges: one starting at the damage is a JSON 500; one spanning it and a multi-range are cut short', async () => {
    const at = await api<ErrorBody>(a.url, 'GET', `/v1/vdis/${damaged}/contents?format=raw`, undefined, {
      range: `bytes=${DEEP_DAMAGE_AT}-${DEEP_DAMAGE_AT + 99}`,
    });
    assertCorruptError(at.status, at.body);
    await assertHealthy();

    const spanning = await slowGet(`${a.url}/v1/vdis/${damaged}/contents?format=raw`, {
      range: `bytes=${4 * MiB}-`,
    });
    assert.equal(spanning.status, 206);
    assertShortPrefix(spanning, source.subarray(4 * MiB));
    await assertHealthy();

    const multi = await slowGet(`${a.url}/v1/vdis/${damaged}/contents?format=raw`, {
      range: `bytes=0-99,${DEEP_DAMAGE_AT}-${DEEP_DAMAGE_AT + 99}`,
    });
    assert.equal(multi.status, 206);
    assert.ok(multi.body.length < Number(multi.headers['content-length']));
    await assertHealthy();

    const head = await fetch(`${a.url}/v1/vdis/${damaged}/contents?format=qcow2`, { method: 'HEAD' });
    assert.equal(head.status, 200);
    assert.equal(head.headers.get('content-length'), String(reference.get('qcow2')?.length));
    const extents = await api(a.url, 'GET', `/v1/vdis/${damaged}/extents`);
    assert.equal(extents.status, 200);
    await assertHealthy();
  });

  test('the xapi alias and a download session are cut short the same way; the session fails with its task', async () => {
    const xapi = await slowGet(`${a.url}/export_raw_vdi?vdi=${damaged}&format=raw`);
    assert.equal(xapi.status, 200);
    assertShortPrefix(xapi, source);
    await assertHealthy();

    const openSession = async () => {
      const t = await api<TransferJson>(a.url, 'POST', '/v1/transfers', {
        vdi: damaged,
        direction: 'download',
        format: 'raw',
      });
      assert.equal(t.status, 201, JSON.stringify(t.body));
      return t.body;
    };
    /** A session that met the damage is over: its task failed, its url serves no more. */
    const assertSessionFailed = async (t: TransferJson) => {
      const task = await waitTask(t.task_id);
      assert.equal(task.status, 'failure');
      assert.equal(task.error?.code, 'IMAGE_CORRUPT');
      const state = await api<{ state: string }>(a.url, 'GET', `/v1/transfers/${t.id}`);
      assert.equal(state.body.state, 'failed');
      const again = await api<ErrorBody>(a.url, 'GET', new URL(t.url).pathname + new URL(t.url).search);
      assert.equal(again.status, 409, JSON.stringify(again.body));
      await assertHealthy();
    };

    // Mid-stream: the body is cut short, then the session ends as failed.
    const midStream = await openSession();
    const session = await slowGet(midStream.url);
    assert.equal(session.status, 200);
    assertShortPrefix(session, source);
    await assertSessionFailed(midStream);

    // Before the first byte: a JSON error, and the same end.
    const atDamage = await openSession();
    const at = await fetch(atDamage.url, { headers: { range: `bytes=${DEEP_DAMAGE_AT}-` } });
    assertCorruptError(at.status, await at.json());
    await assertSessionFailed(atDamage);
  });

  test('checksums, inline and as a task, fail with IMAGE_CORRUPT', async () => {
    const inline = await api<ErrorBody>(a.url, 'GET', `/v1/vdis/${damaged}/checksum?async=false`);
    assertCorruptError(inline.status, inline.body);
    await assertHealthy();
    const started = await api<Task>(a.url, 'GET', `/v1/vdis/${damaged}/checksum?algorithm=md5&async=true`);
    assert.equal(started.status, 202, JSON.stringify(started.body));
    const task = await waitTask(started.body.id);
    assert.equal(task.status, 'failure');
    assert.equal(task.error?.code, 'IMAGE_CORRUPT');
    await assertHealthy();
  });

  test('a resize (a conversion of the stored image) fails with IMAGE_CORRUPT and leaves the VDI as it was', async () => {
    const before = await api<{ generation: number; virtual_size: number }>(
      a.url,
      'GET',
      `/v1/vdis/${damaged}`,
    );
    const res = await api<ErrorBody>(a.url, 'PATCH', `/v1/vdis/${damaged}`, { virtual_size: 2 * DISK_BYTES });
    assertCorruptError(res.status, res.body);
    const after = await api<{ generation: number; virtual_size: number }>(
      a.url,
      'GET',
      `/v1/vdis/${damaged}`,
    );
    assert.equal(after.body.generation, before.body.generation);
    assert.equal(after.body.virtual_size, DISK_BYTES);
    await assertHealthy();
  });

  for (const format of ['raw', 'qcow2']) {
    test(`a ${format} push to a second diskport fails with IMAGE_CORRUPT`, async () => {
      const target = await createVdi(b.url, DISK_BYTES);
      const receiving = await api<TransferJson>(b.url, 'POST', '/v1/transfers', {
        vdi: target.id,
        direction: 'upload',
        format,
      });
      assert.equal(receiving.status, 201, JSON.stringify(receiving.body));
      const push = await api<TransferJson>(a.url, 'POST', '/v1/transfers', {
        vdi: damaged,
        direction: 'download',
        format,
        target_url: receiving.body.url,
      });
      assert.equal(push.status, 201, JSON.stringify(push.body));
      const task = await waitTask(push.body.task_id);
      assert.equal(task.status, 'failure');
      assert.equal(task.error?.code, 'IMAGE_CORRUPT');
      await assertHealthy();
    });
  }

  test('an upload of the damaged file is refused (400), into a VDI of any format, and the server goes on', async () => {
    const bytes = await fsp.readFile(await fileOf(damaged));
    for (const imageFormat of ['raw', 'vhd', 'qcow2']) {
      const vdi = await createVdi(a.url, DISK_BYTES, { image_format: imageFormat });
      const res = await fetch(`${a.url}/v1/vdis/${vdi.id}/contents?format=qcow2`, {
        method: 'PUT',
        body: new Uint8Array(bytes),
      });
      const body = (await res.json()) as ErrorBody;
      assert.equal(res.status, 400, JSON.stringify(body));
      assert.equal(body.error.code, 'MALFORMED_IMAGE');
      await assertHealthy();
    }
  });
});
