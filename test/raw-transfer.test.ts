import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { api, createVdi, curl, sha256File, sha256Url } from './helpers/api.js';
import { seededBytes, startServer, type TestServer, tempDir } from './helpers/server.js';

const MiB = 1024 * 1024;

describe('raw import and export with curl over real sockets', () => {
  let srv: TestServer;
  let dir: string;
  let source: string;
  let vdiId: string;
  before(async () => {
    srv = await startServer();
    dir = await tempDir();
    source = path.join(dir, 'random-64MiB.img');
    await fsp.writeFile(source, seededBytes(64 * MiB, 1));
    vdiId = (await createVdi(srv.url, 64 * MiB)).id;
  });
  after(async () => {
    await srv.close();
    await fsp.rm(dir, { recursive: true, force: true });
  });

  test('curl -T uploads a 64 MiB file (Content-Length) and answers with the finished task', async () => {
    const out = await curl([
      '-T',
      source,
      '-D',
      path.join(dir, 'headers'),
      `${srv.url}/v1/vdis/${vdiId}/contents?format=raw`,
    ]);
    const task = JSON.parse(out.toString());
    assert.equal(task.status, 'success');
    assert.equal(task.bytes_done, 64 * MiB);
    assert.equal(task.progress, 1);
    const headers = await fsp.readFile(path.join(dir, 'headers'), 'utf8');
    assert.match(headers, new RegExp(`Location: /v1/tasks/${task.id}`, 'i'));
    assert.equal(
      await sha256Url(`${srv.url}/v1/vdis/${vdiId}/contents?format=raw`),
      await sha256File(source),
    );
  });

  test('the same bytes through a pipe (curl -T -, chunked) arrive intact', async () => {
    const other = (await createVdi(srv.url, 64 * MiB)).id;
    const out = await new Promise<string>((resolve, reject) => {
      const cat = spawn('cat', [source]);
      const c = spawn('curl', [
        '-sS',
        '--fail-with-body',
        '-T',
        '-',
        `${srv.url}/v1/vdis/${other}/contents?format=raw`,
      ]);
      cat.stdout.pipe(c.stdin);
      let stdout = '';
      c.stdout.on('data', (d) => {
        stdout += d;
      });
      c.on('exit', (code) =>
        code === 0 ? resolve(stdout) : reject(new Error(`curl exited ${code}: ${stdout}`)),
      );
    });
    const task = JSON.parse(out);
    assert.equal(task.status, 'success');
    assert.equal(task.bytes_total, 64 * MiB, 'a chunked upload learns its total when the stream ends');
    assert.equal(await sha256Url(`${srv.url}/v1/vdis/${other}/contents`), await sha256File(source));
  });

  test('downloads whole and by single, open-ended, suffix and multiple ranges, byte-exact', async () => {
    const url = `${srv.url}/v1/vdis/${vdiId}/contents?format=raw`;
    const whole = path.join(dir, 'whole.img');
    await curl(['-o', whole, url]);
    assert.equal(await sha256File(whole), await sha256File(source));

    const src = await fsp.readFile(source);
    const single = await curl(['-r', '1000-1999999', url]);
    assert.ok(single.equals(src.subarray(1000, 2000000)));
    const openEnded = await curl(['-r', `${60 * MiB}-`, url]);
    assert.ok(openEnded.equals(src.subarray(60 * MiB)));
    const suffix = await curl(['-H', 'Range: bytes=-12345', url]);
    assert.ok(suffix.equals(src.subarray(src.length - 12345)));

    const multi = await curl(['-D', path.join(dir, 'mh'), '-r', '0-99,5000-5999,63000000-63000010', url]);
    const headers = await fsp.readFile(path.join(dir, 'mh'), 'utf8');
    const boundary = /boundary=([^\s;]+)/.exec(headers)?.[1];
    assert.ok(boundary, headers);
    const parts = parseMultipart(multi, boundary);
    assert.deepEqual(
      parts.map((p) => p.range),
      [`bytes 0-99/${64 * MiB}`, `bytes 5000-5999/${64 * MiB}`, `bytes 63000000-63000010/${64 * MiB}`],
    );
    assert.ok(parts[0].body.equals(src.subarray(0, 100)));
    assert.ok(parts[1].body.equals(src.subarray(5000, 6000)));
    assert.ok(parts[2].body.equals(src.subarray(63000000, 63000011)));
    const declared = Number(/content-length: (\d+)/i.exec(headers)?.[1]);
    assert.equal(declared, multi.length, 'Content-Length of a multipart response is exact');
  });

  test('a download cut part-way resumes with Range + If-Range to identical bytes', async () => {
    const url = `${srv.url}/v1/vdis/${vdiId}/contents?format=raw`;
    const first = await fetch(url);
    const etag = first.headers.get('etag')!;
    const reader = (first.body as ReadableStream<Uint8Array>).getReader();
    const got: Buffer[] = [];
    let n = 0;
    while (n < 5 * MiB) {
      const { value } = await reader.read();
      got.push(Buffer.from(value!));
      n += value!.length;
    }
    await reader.cancel();
    const rest = await fetch(url, { headers: { range: `bytes=${n}-`, 'if-range': etag } });
    assert.equal(rest.status, 206);
    const all = Buffer.concat([...got, Buffer.from(await rest.arrayBuffer())]);
    assert.ok(all.equals(await fsp.readFile(source)));
  });
});

export function parseMultipart(body: Buffer, boundary: string): { range: string; body: Buffer }[] {
  const parts: { range: string; body: Buffer }[] = [];
  const delim = Buffer.from(`\r\n--${boundary}`);
  let pos = body.indexOf(delim);
  while (pos >= 0) {
    const afterDelim = pos + delim.length;
    if (body.subarray(afterDelim, afterDelim + 2).toString() === '--') break;
    const headerEnd = body.indexOf('\r\n\r\n', afterDelim);
    const headers = body.subarray(afterDelim, headerEnd).toString();
    const next = body.indexOf(delim, headerEnd + 4);
    parts.push({
      range: /Content-Range: (.*)/i.exec(headers)![1].trim(),
      body: body.subarray(headerEnd + 4, next),
    });
    pos = next;
  }
  return parts;
}

describe('sparse VDIs', () => {
  let srv: TestServer;
  before(async () => {
    srv = await startServer();
  });
  after(() => srv.close());

  test('a 1 GiB VDI with 2 MiB of scattered data stays under 8 MiB allocated and exports byte-exact', async () => {
    const size = 1024 * MiB;
    const dir = await tempDir();
    try {
      const file = path.join(dir, 'sparse.img');
      const h = await fsp.open(file, 'w');
      await h.truncate(size);
      const pieces: [number, Buffer][] = [];
      for (let i = 0; i < 32; i++) {
        const at = Math.floor((i * size) / 32) + i * 4096 + 512 * i;
        const data = seededBytes(64 * 1024, 100 + i);
        pieces.push([at, data]);
        await h.write(data, 0, data.length, at);
      }
      await h.close();
      const vdi = await createVdi(srv.url, size);
      const task = JSON.parse(
        (await curl(['-T', file, `${srv.url}/v1/vdis/${vdi.id}/contents?format=raw`])).toString(),
      );
      assert.equal(task.status, 'success');
      const read = await api<{ physical_utilisation: number }>(srv.url, 'GET', `/v1/vdis/${vdi.id}`);
      assert.ok(
        read.body.physical_utilisation < 8 * MiB,
        `physical_utilisation ${read.body.physical_utilisation} should be under 8 MiB`,
      );
      assert.ok(read.body.physical_utilisation >= 2 * MiB);
      assert.equal(await sha256Url(`${srv.url}/v1/vdis/${vdi.id}/contents`), await sha256File(file));
      const r = await fetch(`${srv.url}/v1/vdis/${vdi.id}/contents`, {
        headers: { range: `bytes=${pieces[7][0] - 10}-${pieces[7][0] + 99}` },
      });
      const slice = Buffer.from(await r.arrayBuffer());
      assert.ok(slice.subarray(0, 10).equals(Buffer.alloc(10)));
      assert.ok(slice.subarray(10).equals(pieces[7][1].subarray(0, 100)));
    } finally {
      await fsp.rm(dir, { recursive: true, force: true });
    }
  });
});
