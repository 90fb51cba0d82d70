/**
 * The `diskport` CLI against a real server process, through a TCP proxy that
 * cuts connections at seeded random points: uploads and downloads resume by
 * themselves and the bytes come out the same.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { api, createVdi, curl, execFileP, sha256File, sha256Url } from './helpers/api.js';
import { cutProxy } from './helpers/proxy.js';
import { prng, ROOT, type ServerProcess, seededBytes, spawnServer, tempDir } from './helpers/server.js';

const MiB = 1024 * 1024;
const BLOCK = 512 * 1024;
const CLI = path.join(ROOT, 'src/cli/main.ts');

interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

function runCli(args: string[], env: Record<string, string> = {}): Promise<CliResult> {
  const child = spawn(process.execPath, ['--import', 'tsx', CLI, ...args], {
    cwd: ROOT,
    env: { ...process.env, DISKPORT_SERVER: '', DISKPORT_TOKEN: '', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d) => {
    stdout += d;
  });
  child.stderr.on('data', (d) => {
    stderr += d;
  });
  return new Promise((resolve) => child.on('close', (code) => resolve({ code, stdout, stderr })));
}

/** A sparse file of 512 KiB blocks: seeded random data, holes, and allocated zeros. Returns its data bytes. */
async function sparseSource(file: string, size: number, seed: number): Promise<number> {
  const rnd = prng(seed);
  const h = await fsp.open(file, 'w');
  let data = 0;
  try {
    await h.truncate(size);
    for (let off = 0; off < size; off += BLOCK) {
      const r = rnd();
      if (r < 0.6) {
        await h.write(seededBytes(BLOCK, seed * 1000 + off / BLOCK), 0, BLOCK, off);
        data += BLOCK;
      } else if (r < 0.75) {
        await h.write(Buffer.alloc(BLOCK), 0, BLOCK, off);
      }
    }
  } finally {
    await h.close();
  }
  return data;
}

const RETRY_FAST = [
  '--retry-delay',
  '300',
  '--retries',
  '8',
  '--no-progress',
  '--json',
  ...(process.env.CLI_VERBOSE ? ['-v'] : []),
];

describe('the diskport CLI over a connection that breaks', () => {
  let srv: ServerProcess;
  let dir: string;
  let source: string;
  let dataBytes: number;
  let rawVdi: string;
  const rawNumbers = { sent: 0, filled: 0 };

  before(async () => {
    dir = await tempDir('diskport-cli-');
    srv = await spawnServer(path.join(dir, 'data'));
    source = path.join(dir, 'source.img');
    dataBytes = await sparseSource(source, 32 * MiB, 7);
  });
  after(async () => {
    await srv?.stop();
    await fsp.rm(dir, { recursive: true, force: true });
  });

  test('uploads a 32 MiB raw file with holes through cuts, resumes, and the VDI holds the same bytes', async () => {
    rawVdi = (await createVdi(srv.url, 32 * MiB)).id;
    const proxy = await cutProxy(srv.url, {
      seed: 11,
      cutConnections: 3,
      direction: 'up',
      minBytes: 256 * 1024,
      maxBytes: 6 * MiB,
    });
    try {
      const r = await runCli(['upload', source, '--vdi', rawVdi, '--server', proxy.url, ...RETRY_FAST]);
      assert.equal(r.code, 0, r.stderr);
      if (process.env.CLI_VERBOSE) process.stderr.write(r.stderr);
      const summary = JSON.parse(r.stdout);
      assert.equal(summary.task.status, 'success');
      assert.ok(proxy.cuts >= 2, `only ${proxy.cuts} cuts happened`);
      assert.ok(summary.retries >= 1, 'the CLI retried');
      assert.equal(
        await sha256Url(`${srv.url}/v1/vdis/${rawVdi}/contents?format=raw`),
        await sha256File(source),
      );
      rawNumbers.sent = proxy.bytesUp;
      rawNumbers.filled = summary.zero_bytes_filled;
      // Whatever the server insisted on receiving (data, and zeros if it wants those too), sent about once.
      const required = dataBytes + summary.zero_bytes_filled;
      assert.ok(
        proxy.bytesUp < 1.1 * required,
        `sent ${proxy.bytesUp} bytes for ${required} required (${dataBytes} of data)`,
      );
      process.stderr.write(
        `# raw upload: ${proxy.cuts} cuts, ${summary.retries} retries, sent ${proxy.bytesUp} bytes, data ${dataBytes}, zeros the server asked for ${summary.zero_bytes_filled}, file ${32 * MiB}\n`,
      );
    } finally {
      await proxy.close();
    }
  });

  test('holes are not sent at all: bytes sent stay under 1.1 x the data', () => {
    assert.ok(rawNumbers.sent > 0);
    assert.equal(rawNumbers.filled, 0);
    assert.ok(rawNumbers.sent < 1.1 * dataBytes, `sent ${rawNumbers.sent}, data ${dataBytes}`);
  });

  test('uploads a qcow2 written by qemu-img through cuts, with --checksum; qemu-img compare agrees', async () => {
    const raw = path.join(dir, 'q-source.img');
    const qcow2 = path.join(dir, 'q-source.qcow2');
    await sparseSource(raw, 16 * MiB, 21);
    await execFileP('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2]);
    const vdi = (await createVdi(srv.url, 16 * MiB)).id;
    const proxy = await cutProxy(srv.url, {
      seed: 23,
      cutConnections: 3,
      direction: 'up',
      minBytes: 128 * 1024,
      maxBytes: 3 * MiB,
    });
    try {
      const r = await runCli([
        'upload',
        qcow2,
        '--vdi',
        vdi,
        '--format',
        'qcow2',
        '--chunk-size',
        '2M',
        '--checksum',
        '--server',
        proxy.url,
        ...RETRY_FAST,
      ]);
      assert.equal(r.code, 0, r.stderr);
      assert.ok(proxy.cuts >= 1);
    } finally {
      await proxy.close();
    }
    const exported = path.join(dir, 'q-exported.img');
    await curl(['-o', exported, `${srv.url}/v1/vdis/${vdi}/contents?format=raw`]);
    await execFileP('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', raw, exported]);
  });

  test('downloads through cuts with Range and If-Range; same bytes, and sparse where the disk has holes', async () => {
    const proxy = await cutProxy(srv.url, {
      seed: 31,
      cutConnections: 4,
      direction: 'down',
      minBytes: 512 * 1024,
      maxBytes: 8 * MiB,
    });
    const out = path.join(dir, 'downloaded.img');
    try {
      const r = await runCli(['download', '--vdi', rawVdi, '-o', out, '--server', proxy.url, ...RETRY_FAST]);
      assert.equal(r.code, 0, r.stderr);
      assert.ok(proxy.cuts >= 3, `only ${proxy.cuts} cuts happened`);
      assert.ok(JSON.parse(r.stdout).retries >= 1);
    } finally {
      await proxy.close();
    }
    assert.equal(await sha256File(out), await sha256File(source));
    const st = await fsp.stat(out);
    assert.equal(st.size, 32 * MiB);
    assert.ok(
      st.blocks * 512 <= dataBytes + MiB,
      `${st.blocks * 512} bytes allocated for ${dataBytes} bytes of data`,
    );
  });

  for (const format of ['vhd', 'qcow2'] as const) {
    test(`downloads the disk as ${format} through cuts; qemu-img compare agrees with the source`, async () => {
      const proxy = await cutProxy(srv.url, {
        seed: 40 + format.length,
        cutConnections: 3,
        direction: 'down',
        minBytes: 512 * 1024,
        maxBytes: 6 * MiB,
      });
      const out = path.join(dir, `downloaded.${format}`);
      try {
        const r = await runCli([
          'download',
          '--vdi',
          rawVdi,
          '--format',
          format,
          '-o',
          out,
          '--server',
          proxy.url,
          ...RETRY_FAST,
        ]);
        assert.equal(r.code, 0, r.stderr);
        assert.ok(proxy.cuts >= 2, `only ${proxy.cuts} cuts happened`);
      } finally {
        await proxy.close();
      }
      await execFileP('qemu-img', [
        'compare',
        '-f',
        'raw',
        '-F',
        format === 'vhd' ? 'vpc' : 'qcow2',
        source,
        out,
      ]);
    });
  }

  test('uploads a vhd written by qemu-img through cuts; qemu-img compare agrees', async () => {
    const vhd = path.join(dir, 'source.vhd');
    await execFileP('qemu-img', ['convert', '-f', 'raw', '-O', 'vpc', source, vhd]);
    const vdi = (await createVdi(srv.url, 32 * MiB)).id;
    const proxy = await cutProxy(srv.url, {
      seed: 51,
      cutConnections: 3,
      direction: 'up',
      minBytes: 256 * 1024,
      maxBytes: 4 * MiB,
    });
    try {
      const r = await runCli([
        'upload',
        vhd,
        '--vdi',
        vdi,
        '--format',
        'vhd',
        '--server',
        proxy.url,
        ...RETRY_FAST,
      ]);
      assert.equal(r.code, 0, r.stderr);
      assert.ok(proxy.cuts >= 2, `only ${proxy.cuts} cuts happened`);
    } finally {
      await proxy.close();
    }
    const out = path.join(dir, 'uploaded-vhd.raw');
    await execFileP('curl', ['-sS', '-o', out, `${srv.url}/v1/vdis/${vdi}/contents?format=raw`]);
    await execFileP('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', source, out]);
  });

  test('diskport --help and each command --help document every flag', async () => {
    const top = await runCli(['--help']);
    assert.equal(top.code, 0);
    for (const word of ['upload', 'download', 'DISKPORT_SERVER', 'DISKPORT_TOKEN'])
      assert.match(top.stdout, new RegExp(word));
    const up = await runCli(['upload', '--help']);
    assert.equal(up.code, 0);
    for (const flag of [
      '--vdi',
      '--format',
      '--server',
      '--token',
      '--chunk-size',
      '--parallel',
      '--retries',
      '--retry-time',
      '--retry-delay',
      '--no-progress',
      '--checksum',
      '--ttl',
      '--json',
    ]) {
      assert.ok(up.stdout.includes(flag), `upload --help lacks ${flag}`);
    }
    const down = await runCli(['download', '--help']);
    for (const flag of [
      '--vdi',
      '--format',
      '--output',
      '--server',
      '--token',
      '--retries',
      '--no-progress',
      '--ttl',
    ]) {
      assert.ok(down.stdout.includes(flag), `download --help lacks ${flag}`);
    }
  });

  test('Ctrl-C cancels the upload session, so the VDI is free at once', async () => {
    const vdi = (await createVdi(srv.url, 32 * MiB)).id;
    // Every connection breaks after a few KiB: the CLI is still retrying when it is interrupted.
    const proxy = await cutProxy(srv.url, {
      seed: 61,
      cutConnections: 1000,
      direction: 'up',
      minBytes: 16 * 1024,
      maxBytes: 32 * 1024,
    });
    try {
      const child = spawn(
        process.execPath,
        [
          '--import',
          'tsx',
          CLI,
          'upload',
          source,
          '--vdi',
          vdi,
          '--server',
          proxy.url,
          '--no-progress',
          '--retry-delay',
          '500',
        ],
        { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] },
      );
      let stderr = '';
      child.stderr.on('data', (d) => {
        stderr += d;
      });
      while (!/retry/.test(stderr)) await new Promise((r) => setTimeout(r, 50));
      const exited = once(child, 'exit');
      child.kill('SIGINT');
      const [code] = await exited;
      assert.equal(code, 130, stderr);
      assert.match(stderr, /cancelling the upload session/);
    } finally {
      await proxy.close();
    }
    const again = await api<{ id: string }>(srv.url, 'POST', '/v1/transfers', { vdi, direction: 'upload' });
    assert.equal(again.status, 201, 'the VDI is not left busy');
    await api(srv.url, 'DELETE', `/v1/transfers/${again.body.id}`);
  });

  test('an unknown VDI exits 1 with the server message', async () => {
    const expected = await api<{ error: { message: string } }>(srv.url, 'POST', '/v1/transfers', {
      vdi: 'no-such-vdi',
      direction: 'upload',
      format: 'raw',
    });
    assert.equal(expected.status, 404);
    const r = await runCli(['upload', source, '--vdi', 'no-such-vdi', '--no-progress'], {
      DISKPORT_SERVER: srv.url,
    });
    assert.equal(r.code, 1);
    assert.ok(r.stderr.includes(expected.body.error.message), r.stderr);
    const d = await runCli([
      'download',
      '--vdi',
      'no-such-vdi',
      '-o',
      path.join(dir, 'x'),
      '--server',
      srv.url,
    ]);
    assert.equal(d.code, 1);
    assert.ok(d.stderr.includes(expected.body.error.message), d.stderr);
  });
});
