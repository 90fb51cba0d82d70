/**
 * Pull: diskport fetches an image from an http(s) URL itself, resumes a
 * dropped connection with Range + If-Range, restarts when the source
 * changes, and fails without touching the VDI when the source lies.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createReadStream, promises as fsp } from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { api, createVdi, curl, execFileP, sha256File, sha256Url, type TransferJson } from './helpers/api.js';
import {
  type ServerProcess,
  seededBytes,
  spawnServer,
  startServer,
  type TestServer,
  tempDir,
} from './helpers/server.js';
import { waitFor } from './helpers/wait.js';

const MiB = 1024 * 1024;
/** Odd on purpose: not a multiple of any cluster or block size, nor a CHS geometry. */
const VIRTUAL_SIZE = 40 * MiB + 7 * 512;
const QEMU_FORMAT = { raw: 'raw', vhd: 'vpc', qcow2: 'qcow2' } as const;

type Task = {
  id: string;
  status: string;
  bytes_done: number;
  bytes_total: number | null;
  error: { code: string; message: string } | null;
};
type ErrorBody = { error: { code: string; message: string } };

interface Served {
  file: string;
  etag: string;
  /** Cut the connection after this many body bytes... */
  cutAfter?: number;
  /** ...on this many requests (then serve normally). */
  cuts?: number;
  /** Announce this many bytes more than the file has, and hang up when it runs out. */
  extra?: number;
  /** Send this Content-Encoding with the (unencoded) bytes. */
  encoding?: string;
  /** Called when a connection was cut (e.g. to change the file under the pull). */
  onCut?: () => void;
  /** Stop sending after this many body bytes on the first request, and hold the connection... */
  stallAfter?: number;
  /** ...until this is called (set by the server once it stalls). */
  release?: () => void;
  requests: { range?: string; ifRange?: string; status: number }[];
  bytesSent: number;
}

/** A plain file server: single ranges, strong ETags, If-Range, and connections cut on demand. */
async function fileServer() {
  const files = new Map<string, Served>();
  const server = http.createServer(async (req, res) => {
    const entry = files.get(req.url ?? '');
    if (!entry) {
      res.writeHead(404).end();
      return;
    }
    const size = (await fsp.stat(entry.file)).size;
    const declared = size + (entry.extra ?? 0);
    const range = req.headers.range;
    const ifRange = req.headers['if-range'] as string | undefined;
    let start = 0;
    let end = declared - 1;
    let status = 200;
    const m = range && (!ifRange || ifRange === entry.etag) ? /^bytes=(\d+)-(\d*)$/.exec(range) : null;
    if (m) {
      start = Number(m[1]);
      if (m[2]) end = Math.min(end, Number(m[2]));
      if (start >= declared) {
        entry.requests.push({ range, ifRange, status: 416 });
        res.writeHead(416, { 'content-range': `bytes */${declared}` }).end();
        return;
      }
      status = 206;
    }
    entry.requests.push({ range, ifRange, status });
    res.writeHead(status, {
      'content-length': String(end - start + 1),
      'content-type': 'application/octet-stream',
      'accept-ranges': 'bytes',
      etag: entry.etag,
      ...(entry.encoding && { 'content-encoding': entry.encoding }),
      ...(status === 206 && { 'content-range': `bytes ${start}-${end}/${declared}` }),
    });
    const cut = entry.cuts && entry.cuts > 0 ? entry.cutAfter : undefined;
    if (cut !== undefined) entry.cuts = (entry.cuts ?? 0) - 1;
    let sent = 0;
    const stop = Math.min(end, size - 1);
    if (start <= stop) {
      for await (const chunk of createReadStream(entry.file, {
        start,
        end: stop,
        highWaterMark: 256 * 1024,
      })) {
        let piece = chunk as Buffer;
        if (cut !== undefined && sent + piece.length > cut) piece = piece.subarray(0, cut - sent);
        sent += piece.length;
        entry.bytesSent += piece.length;
        if (!res.write(piece)) await once(res, 'drain');
        if (cut !== undefined && sent >= cut) break;
        if (entry.stallAfter !== undefined && sent >= entry.stallAfter) {
          entry.stallAfter = undefined;
          await new Promise<void>((r) => {
            entry.release = r;
          });
          res.socket?.destroy();
          return;
        }
      }
    }
    if (sent < end - start + 1) {
      // Short: hang up without finishing the response.
      await new Promise((r) => setTimeout(r, 20));
      res.socket?.destroy();
      if (cut !== undefined) entry.onCut?.();
      return;
    }
    res.end();
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  return {
    base,
    serve(name: string, file: string, opts: Partial<Served> = {}): Served {
      const entry: Served = { file, etag: `"${name}-1"`, requests: [], bytesSent: 0, ...opts };
      files.set(`/${name}`, entry);
      return entry;
    },
    close: () => {
      server.closeAllConnections();
      return new Promise((r) => server.close(r));
    },
  };
}

async function writeSparseDisk(file: string, seed: number): Promise<void> {
  const h = await fsp.open(file, 'w');
  await h.truncate(VIRTUAL_SIZE);
  for (let i = 0; i < 8; i++) {
    const at = Math.floor((i * VIRTUAL_SIZE) / 8 / 512) * 512 + (i % 3) * 4096;
    const data = seededBytes(i % 2 === 0 ? 3 * MiB : 256 * 1024, seed + i);
    await h.write(data, 0, data.length, at);
  }
  const tail = seededBytes(7 * 512, seed + 100);
  await h.write(tail, 0, tail.length, VIRTUAL_SIZE - tail.length);
  await h.close();
}

describe('pull: diskport fetches the image itself', () => {
  let dir: string;
  let srv: ServerProcess;
  let files: Awaited<ReturnType<typeof fileServer>>;
  const source = (format: keyof typeof QEMU_FORMAT) => path.join(dir, `source.${format}`);

  before(async () => {
    dir = await tempDir();
    await writeSparseDisk(source('raw'), 700);
    await execFileP('qemu-img', ['convert', '-f', 'raw', '-O', 'vpc', source('raw'), source('vhd')]);
    await execFileP('qemu-img', [
      'convert',
      '-f',
      'raw',
      '-O',
      'qcow2',
      '-c',
      source('raw'),
      source('qcow2'),
    ]);
    await writeSparseDisk(path.join(dir, 'other.raw'), 900);
    srv = await spawnServer(path.join(dir, 'data'), ['--allow-fetch', '127.0.0.0/8']);
    files = await fileServer();
  });
  after(async () => {
    await srv?.stop();
    await files?.close();
    await fsp.rm(dir, { recursive: true, force: true });
  });

  const pull = async (body: Record<string, unknown>) => {
    const res = await api<TransferJson>(srv.url, 'POST', '/v1/transfers', { direction: 'upload', ...body });
    assert.equal(res.status, 201, JSON.stringify(res.body));
    return res.body;
  };
  const waitTask = async (id: string) => {
    for (let i = 0; ; i++) {
      const res = await api<Task>(srv.url, 'GET', `/v1/tasks/${id}?wait=5`);
      if (!['pending', 'running'].includes(res.body.status)) return res.body;
      assert.ok(i < 12, `task still running after a minute: ${JSON.stringify(res.body)}`);
    }
  };
  const exportRaw = async (vdi: string, name: string) => {
    const out = path.join(dir, name);
    await curl(['-o', out, `${srv.url}/v1/vdis/${vdi}/contents?format=raw`]);
    return out;
  };

  for (const format of ['raw', 'vhd', 'qcow2'] as const) {
    test(`pulls a ${format} image through two cut connections, resumes with Range + If-Range, and gets the same disk`, async (t) => {
      const file = source(format);
      const size = (await fsp.stat(file)).size;
      const served = files.serve(`disk-${format}`, file, { cutAfter: Math.floor(size / 3), cuts: 2 });
      const vdi = await createVdi(srv.url, VIRTUAL_SIZE);
      const pulled = await pull({ vdi: vdi.id, format, source_url: `${files.base}/disk-${format}` });
      const task = await waitTask(pulled.task_id);
      assert.equal(task.status, 'success', JSON.stringify(task));
      assert.equal(task.bytes_total, size, 'progress is measured against Content-Length');

      // Each resume asked for the rest only, under the validator of the first answer.
      assert.deepEqual(
        served.requests.map((r) => r.status),
        [200, 206, 206],
      );
      assert.ok(
        served.requests.slice(1).every((r) => r.range?.startsWith('bytes=') && r.ifRange === served.etag),
      );
      t.diagnostic(`${format}: ${served.bytesSent} bytes served for a ${size}-byte image`);
      assert.ok(served.bytesSent < size * 1.1, `${served.bytesSent} bytes sent for a ${size}-byte image`);

      const out = await exportRaw(vdi.id, `pulled-${format}.raw`);
      await execFileP('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', source('raw'), out]);
      const after = await api<TransferJson>(srv.url, 'GET', `/v1/transfers/${pulled.id}`);
      assert.equal(after.body.state, 'committed');
    });
  }

  test('a pull cut by a kill -9 of diskport resumes after the restart from the bytes on disk, with If-Range', async () => {
    const file = source('raw');
    const size = (await fsp.stat(file)).size;
    const served = files.serve('across-restart', file, { stallAfter: 16 * MiB });
    const vdi = await createVdi(srv.url, VIRTUAL_SIZE);
    const t = await pull({ vdi: vdi.id, format: 'raw', source_url: `${files.base}/across-restart` });
    const release = await waitFor('the source to stall after 16 MiB', () => served.release);
    // A checkpoint (once a second while the body streams) makes the first bytes durable: wait for it.
    // (The list, unlike GET /v1/transfers/{id}, answers without waiting for the stalled write to end.)
    const durable = await waitFor('a checkpoint of the received bytes', async () => {
      const list = await api<TransferJson[]>(srv.url, 'GET', `/v1/transfers?vdi=${vdi.id}`);
      return list.body.find((x) => x.id === t.id)?.bytes_received;
    });
    const dataDir = path.join(dir, 'data');
    await srv.stop('SIGKILL');
    release();
    srv = await spawnServer(dataDir, ['--allow-fetch', '127.0.0.0/8']);
    const task = await waitTask(t.task_id);
    assert.equal(task.status, 'success', JSON.stringify(task));
    assert.equal(served.requests.length, 2);
    const resumedAt = Number(/^bytes=(\d+)-$/.exec(served.requests[1].range ?? '')?.[1]);
    assert.ok(resumedAt >= durable && resumedAt <= 16 * MiB, `resumed at ${served.requests[1].range}`);
    assert.equal(served.requests[1].ifRange, served.etag, 'the validator survived the restart');
    assert.ok(served.bytesSent < size * 1.1, `${served.bytesSent} bytes served for ${size}`);
    assert.equal(await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`), await sha256File(file));
  });

  test('a source that changes mid-way (new ETag) restarts from 0 and ends with the new image', async () => {
    const a = source('raw');
    const b = path.join(dir, 'other.raw');
    const served = files.serve('changing', a, { cutAfter: 8 * MiB, cuts: 1 });
    served.onCut = () => {
      served.file = b;
      served.etag = '"changing-2"';
    };
    const vdi = await createVdi(srv.url, VIRTUAL_SIZE);
    const t = await pull({ vdi: vdi.id, format: 'raw', source_url: `${files.base}/changing` });
    const task = await waitTask(t.task_id);
    assert.equal(task.status, 'success', JSON.stringify(task));
    // The resume carried the old validator; the server answered the whole new file.
    assert.deepEqual(
      served.requests.map((r) => [r.status, r.ifRange]),
      [
        [200, undefined],
        [200, '"changing-1"'],
      ],
    );
    assert.equal(await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`), await sha256File(b));
  });

  test('a vhd source that changes mid-way restarts from 0: the disk that streamed so far is thrown away', async () => {
    const b = path.join(dir, 'other.vhd');
    await execFileP('qemu-img', ['convert', '-f', 'raw', '-O', 'vpc', path.join(dir, 'other.raw'), b]);
    const served = files.serve('changing-vhd', source('vhd'), { cutAfter: 8 * MiB, cuts: 1 });
    served.onCut = () => {
      served.file = b;
      served.etag = '"changing-vhd-2"';
    };
    const vdi = await createVdi(srv.url, VIRTUAL_SIZE);
    const t = await pull({ vdi: vdi.id, format: 'vhd', source_url: `${files.base}/changing-vhd` });
    const task = await waitTask(t.task_id);
    assert.equal(task.status, 'success', JSON.stringify(task));
    assert.equal(served.requests.length, 2, 'one cut, then the whole new file');
    assert.equal(
      await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`),
      await sha256File(path.join(dir, 'other.raw')),
    );
    const staging = path.join(dir, 'data', 'srs', 'local', '.staging');
    // The files go right after the task ends.
    await waitFor(
      'no disk of an earlier epoch left behind',
      async () => (await fsp.readdir(staging)).length === 0,
    );
  });

  test('a source that changes on every resume fails with SOURCE_CHANGED after bounded restarts; the VDI is unchanged', async () => {
    const vdi = await createVdi(srv.url, VIRTUAL_SIZE);
    const before = await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`);
    let version = 1;
    const served = files.serve('unstable', source('raw'), { cutAfter: MiB, cuts: 100 });
    served.onCut = () => {
      served.etag = `"unstable-${++version}"`;
    };
    const t = await pull({ vdi: vdi.id, format: 'raw', source_url: `${files.base}/unstable` });
    const task = await waitTask(t.task_id);
    assert.equal(task.status, 'failure', JSON.stringify(task));
    assert.equal(task.error?.code, 'SOURCE_CHANGED', task.error?.message);
    // Each resume carried the validator of the answer before it, and got the whole (changed) file.
    assert.ok(served.requests.length >= 4, `${served.requests.length} requests`);
    assert.ok(
      served.requests.slice(1).every((r, i) => r.status === 200 && r.ifRange === `"unstable-${i + 1}"`),
      JSON.stringify(served.requests),
    );
    assert.equal(await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`), before);
    assert.equal((await api<TransferJson>(srv.url, 'GET', `/v1/transfers/${t.id}`)).body.state, 'failed');
  });

  test('a source that sends the image encoded (Content-Encoding: gzip) fails at once with SOURCE_UNUSABLE', async () => {
    const vdi = await createVdi(srv.url, VIRTUAL_SIZE);
    const before = await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`);
    const served = files.serve('encoded', source('raw'), { encoding: 'gzip' });
    const t = await pull({ vdi: vdi.id, format: 'raw', source_url: `${files.base}/encoded` });
    const task = await waitTask(t.task_id);
    assert.equal(task.status, 'failure', JSON.stringify(task));
    assert.equal(task.error?.code, 'SOURCE_UNUSABLE');
    assert.match(task.error?.message ?? '', /gzip/);
    assert.equal(served.requests.length, 1, 'no retry: the source will send the same again');
    assert.equal(await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`), before);
  });

  test('a wrong checksum fails the task with CHECKSUM_MISMATCH and leaves the VDI unchanged', async () => {
    const vdi = await createVdi(srv.url, VIRTUAL_SIZE);
    const before = await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`);
    files.serve('checksum', source('qcow2'));
    const t = await pull({
      vdi: vdi.id,
      format: 'qcow2',
      source_url: `${files.base}/checksum`,
      checksum: `sha256:${'0'.repeat(64)}`,
    });
    const task = await waitTask(t.task_id);
    assert.equal(task.status, 'failure');
    assert.equal(task.error?.code, 'CHECKSUM_MISMATCH');
    assert.equal(await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`), before);
    assert.equal((await api<TransferJson>(srv.url, 'GET', `/v1/transfers/${t.id}`)).body.state, 'failed');
  });

  test('a body shorter than its Content-Length fails after bounded retries; the VDI is unchanged', async () => {
    const vdi = await createVdi(srv.url, VIRTUAL_SIZE);
    const before = await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`);
    // The file claims 1 MiB more than it has: every attempt stops short.
    const short = path.join(dir, 'short.raw');
    await fsp.copyFile(source('raw'), short);
    await fsp.truncate(short, VIRTUAL_SIZE - MiB);
    const served = files.serve('short', short, { extra: MiB });
    const t = await pull({ vdi: vdi.id, format: 'raw', source_url: `${files.base}/short` });
    const task = await waitTask(t.task_id);
    assert.equal(task.status, 'failure', JSON.stringify(task));
    assert.equal(task.error?.code, 'SOURCE_INCOMPLETE', task.error?.message);
    // The first attempt, then resumes from where it stopped, never from 0.
    assert.ok(
      served.requests.length >= 3 && served.requests.length <= 8,
      `${served.requests.length} requests`,
    );
    assert.ok(served.requests.slice(1).every((r) => r.range && r.range !== 'bytes=0-'));
    assert.equal(served.requests.at(-1)?.range, `bytes=${VIRTUAL_SIZE - MiB}-`);
    assert.equal(await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`), before);
  });

  test('an image larger than the VDI fails with TOO_LARGE before a byte lands', async () => {
    const vdi = await createVdi(srv.url, 4 * MiB);
    files.serve('large', source('raw'));
    const t = await pull({ vdi: vdi.id, format: 'raw', source_url: `${files.base}/large` });
    const task = await waitTask(t.task_id);
    assert.equal(task.status, 'failure');
    assert.equal(task.error?.code, 'TOO_LARGE');
  });

  test('the source answering 404 fails the task at once with SOURCE_UNAVAILABLE', async () => {
    const vdi = await createVdi(srv.url, MiB);
    const t = await pull({ vdi: vdi.id, format: 'raw', source_url: `${files.base}/missing` });
    const task = await waitTask(t.task_id);
    assert.equal(task.status, 'failure');
    assert.equal(task.error?.code, 'SOURCE_UNAVAILABLE');
    // The VDI is free again for the next import.
    const again = await pull({ vdi: vdi.id, format: 'raw', source_url: `${files.base}/missing` });
    assert.ok(again.id);
  });
});

describe('pull: the SSRF guard', () => {
  let srv: TestServer;
  before(async () => {
    srv = await startServer();
  });
  after(() => srv.close());

  for (const url of [
    'http://127.0.0.1:9/disk.raw',
    'http://localhost/disk.raw',
    'http://[::1]/disk.raw',
    'http://169.254.169.254/latest/meta-data',
    'http://0.0.0.0/',
    'http://[::ffff:127.0.0.1]/',
    'https://[fe80::1]/',
  ]) {
    test(`refuses ${url} when --allow-fetch does not list it (400 FETCH_TARGET_FORBIDDEN)`, async () => {
      const vdi = await createVdi(srv.url, MiB);
      const res = await api<ErrorBody>(srv.url, 'POST', '/v1/transfers', {
        vdi: vdi.id,
        direction: 'upload',
        source_url: url,
      });
      assert.equal(res.status, 400);
      assert.equal(res.body.error.code, 'FETCH_TARGET_FORBIDDEN');
      // Nothing was opened: the VDI takes another session.
      const ok = await api(srv.url, 'POST', '/v1/transfers', { vdi: vdi.id, direction: 'upload' });
      assert.equal(ok.status, 201);
    });
  }

  test('a host that does not resolve is 400 FETCH_TARGET_UNRESOLVABLE, for a pull and a push', async () => {
    const vdi = await createVdi(srv.url, MiB);
    for (const [direction, field] of [
      ['upload', 'source_url'],
      ['download', 'target_url'],
    ] as const) {
      const res = await api<ErrorBody>(srv.url, 'POST', '/v1/transfers', {
        vdi: vdi.id,
        direction,
        // .invalid never resolves (RFC 6761).
        [field]: 'http://no-such-host.invalid/v1/transfers/x/data?token=y',
      });
      assert.equal(res.status, 400, field);
      assert.equal(res.body.error.code, 'FETCH_TARGET_UNRESOLVABLE', field);
      assert.match(res.body.error.message, /no-such-host\.invalid/);
    }
    // Nothing was opened: the VDI takes another session.
    assert.equal(
      (await api(srv.url, 'POST', '/v1/transfers', { vdi: vdi.id, direction: 'upload' })).status,
      201,
    );
  });

  test('only http and https URLs', async () => {
    const vdi = await createVdi(srv.url, MiB);
    for (const url of ['ftp://example.org/disk.raw', 'file:///etc/passwd', 'not a url']) {
      const res = await api<ErrorBody>(srv.url, 'POST', '/v1/transfers', {
        vdi: vdi.id,
        direction: 'upload',
        source_url: url,
      });
      assert.equal(res.status, 400, url);
      assert.equal(res.body.error.code, 'INVALID_URL', url);
    }
    const down = await api<ErrorBody>(srv.url, 'POST', '/v1/transfers', {
      vdi: vdi.id,
      direction: 'download',
      source_url: 'http://example.org/disk.raw',
    });
    assert.equal(down.status, 400);
  });
});
