/**
 * curl is the reference client: through a proxy that cuts connections at
 * seeded random points, uploads resume with HEAD + `curl -C <offset> -T` and
 * downloads with `curl -C -`, in every format, byte-exact, each byte sent
 * about once.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { api, createVdi, execFileP, sha256File, type TransferJson } from './helpers/api.js';
import { cutProxy } from './helpers/proxy.js';
import { type ServerProcess, seededBytes, spawnServer, tempDir } from './helpers/server.js';

const MiB = 1024 * 1024;
const SIZE = 24 * MiB;
const QEMU_FORMAT = { raw: 'raw', vhd: 'vpc', qcow2: 'qcow2' } as const;
type Format = keyof typeof QEMU_FORMAT;

/** curl's exit status and stderr; a cut connection is an ordinary outcome here. */
function runCurl(args: string[]): Promise<{ code: number; stderr: string }> {
  return new Promise((resolve) => {
    execFile('curl', ['-sS', ...args], (err, _stdout, stderr) => {
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stderr });
    });
  });
}

describe('curl resumes through a connection that breaks', () => {
  let srv: ServerProcess;
  let dir: string;
  let raw: string;
  const image = (f: Format) => (f === 'raw' ? raw : path.join(dir, `source.${f}`));

  before(async () => {
    dir = await tempDir('diskport-curl-');
    srv = await spawnServer(path.join(dir, 'data'));
    raw = path.join(dir, 'source.raw');
    const disk = Buffer.alloc(SIZE);
    for (let i = 0; i < 5; i++) seededBytes(3 * MiB, 60 + i).copy(disk, i * 5 * MiB + i * 4096);
    await fsp.writeFile(raw, disk);
    await execFileP('qemu-img', ['convert', '-f', 'raw', '-O', 'vpc', raw, image('vhd')]);
    await execFileP('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, image('qcow2')]);
  });
  after(async () => {
    await srv?.stop();
    await fsp.rm(dir, { recursive: true, force: true });
  });

  for (const format of ['raw', 'vhd', 'qcow2'] as const) {
    test(`uploads ${format} with HEAD + curl -C <offset> -T after every cut, byte-exact`, async () => {
      const file = image(format);
      const size = (await fsp.stat(file)).size;
      const vdi = await createVdi(srv.url, SIZE);
      const t = (
        await api<TransferJson>(srv.url, 'POST', '/v1/transfers', {
          vdi: vdi.id,
          direction: 'upload',
          format,
          size,
        })
      ).body;
      const proxy = await cutProxy(srv.url, {
        seed: format.length,
        cutConnections: 3,
        direction: 'up',
        minBytes: MiB,
        maxBytes: 6 * MiB,
      });
      try {
        const url = `${proxy.url}/v1/transfers/${t.id}/data?token=${t.token}`;
        for (let attempt = 0; ; attempt++) {
          assert.ok(attempt < 10, 'the upload should finish within a few resumes');
          // Asked past the proxy: its cuts are for the data.
          const head = await fetch(t.url, { method: 'HEAD' });
          const offset = Number(head.headers.get('upload-offset'));
          if (offset === size) break;
          await runCurl(['-H', 'Expect:', '-C', String(offset), '-T', file, url]);
        }
        assert.ok(proxy.cuts >= 2, `only ${proxy.cuts} cuts happened`);
        assert.ok(proxy.bytesUp < 1.1 * size, `${proxy.bytesUp} bytes sent for a ${size}-byte image`);
      } finally {
        await proxy.close();
      }
      const task = await api<{ status: string }>(
        srv.url,
        'POST',
        `/v1/transfers/${t.id}/finalize?token=${t.token}&wait=60`,
      );
      assert.equal(task.body.status, 'success', JSON.stringify(task.body));
      const out = path.join(dir, `uploaded-${format}.raw`);
      await execFileP('curl', ['-sS', '-o', out, `${srv.url}/v1/vdis/${vdi.id}/contents?format=raw`]);
      assert.equal(await sha256File(out), await sha256File(raw));
    });
  }

  for (const format of ['raw', 'vhd', 'qcow2'] as const) {
    test(`downloads ${format} with curl -C - after every cut, byte-exact`, async () => {
      const vdi = await createVdi(srv.url, SIZE);
      await execFileP('curl', ['-sS', '-T', raw, `${srv.url}/v1/vdis/${vdi.id}/contents?format=raw`]);
      const t = (
        await api<TransferJson>(srv.url, 'POST', '/v1/transfers', {
          vdi: vdi.id,
          direction: 'download',
          format,
        })
      ).body;
      const size = Number((await fetch(t.url, { method: 'HEAD' })).headers.get('content-length'));
      const proxy = await cutProxy(srv.url, {
        seed: 10 + format.length,
        cutConnections: 3,
        direction: 'down',
        minBytes: MiB,
        maxBytes: Math.min(6 * MiB, size - 1),
      });
      const out = path.join(dir, `downloaded.${format}`);
      await fsp.rm(out, { force: true });
      try {
        const url = `${proxy.url}/v1/transfers/${t.id}/data?token=${t.token}`;
        for (let attempt = 0; ; attempt++) {
          assert.ok(attempt < 10, 'the download should finish within a few resumes');
          const have = await fsp.stat(out).then(
            (s) => s.size,
            () => 0,
          );
          if (have === size) break;
          await runCurl(['-C', '-', '-o', out, url]);
        }
        assert.ok(proxy.cuts >= 2, `only ${proxy.cuts} cuts happened`);
        assert.ok(proxy.bytesDown < 1.1 * size + 64 * 1024, `${proxy.bytesDown} bytes received for ${size}`);
      } finally {
        await proxy.close();
      }
      const whole = path.join(dir, `whole.${format}`);
      await execFileP('curl', ['-sS', '-o', whole, t.url]);
      assert.equal(
        await sha256File(out),
        await sha256File(whole),
        'the resumed file is the export, byte for byte',
      );
      await execFileP('qemu-img', ['compare', '-f', 'raw', '-F', QEMU_FORMAT[format], raw, out]);
    });
  }
});
