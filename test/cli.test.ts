/**
 * The `diskport` CLI against a real server process, through a TCP proxy that
 * cuts connections at seeded random points: uploads and downloads resume by
 * themselves and the bytes come out the same.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { api, createVdi, curl, execFileP, sha256File, sha256Url } from './helpers/api.js';
import { entryArgs } from './helpers/entry.js';
import { failNthDirectWrite } from './helpers/faults.js';
import { type CutProxy, cutProxy } from './helpers/proxy.js';
import {
  prng,
  ROOT,
  type ServerProcess,
  seededBytes,
  spawnServer,
  startServer,
  tempDir,
} from './helpers/server.js';

const MiB = 1024 * 1024;
const BLOCK = 512 * 1024;

interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Where the CLI keeps what a later run resumes: this file's own, not the user's. */
const STATE_DIR = path.join(os.tmpdir(), `diskport-cli-state-${process.pid}`);
const CLI_ENV = { DISKPORT_SERVER: '', DISKPORT_TOKEN: '', DISKPORT_STATE_DIR: STATE_DIR };

/** Starts the CLI; `out` fills as it writes, `exited` resolves with its exit code. */
function startCli(args: string[], env: Record<string, string> = {}) {
  const child = spawn(process.execPath, [...entryArgs('cli/main'), ...args], {
    cwd: ROOT,
    env: { ...process.env, ...CLI_ENV, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const out = { stdout: '', stderr: '' };
  child.stdout.on('data', (d) => {
    out.stdout += d;
  });
  child.stderr.on('data', (d) => {
    out.stderr += d;
  });
  const closed = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  return { child, out, exited: once(child, 'exit'), closed };
}

async function runCli(args: string[], env: Record<string, string> = {}): Promise<CliResult> {
  const run = startCli(args, env);
  const code = await run.closed;
  return { code, ...run.out };
}

/** Starts the CLI and resolves once its stderr matches `ready` (it must not exit before). */
async function spawnCliUntil(args: string[], ready: RegExp) {
  const run = startCli(args);
  while (!ready.test(run.out.stderr)) {
    if (run.child.exitCode !== null) assert.fail(`the CLI exited ${run.child.exitCode}: ${run.out.stderr}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return run;
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
    await fsp.rm(STATE_DIR, { recursive: true, force: true });
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

  /** A proxy that never cuts by itself: a link for a test to take down (`down()`) and bring back. */
  const linkProxy = () =>
    cutProxy(srv.url, { seed: 0, cutConnections: 0, direction: 'up', minBytes: 0, maxBytes: 0 });

  /** Runs the CLI through `proxy` and takes the link down for good once `bytes` have crossed it. */
  async function runUntilLinkDies(args: string[], proxy: CutProxy, bytes: number): Promise<CliResult> {
    proxy.downAt = proxy.bytesUp + proxy.bytesDown + bytes;
    try {
      return await runCli([
        ...args,
        '--server',
        proxy.url,
        '--retries',
        '2',
        '--retry-delay',
        '100',
        '--no-progress',
        '--json',
      ]);
    } finally {
      proxy.up();
    }
  }

  const savedEntries = async () =>
    (await fsp.readdir(STATE_DIR).catch(() => [])).filter((f) => f.endsWith('.json'));

  test('an upload whose link stays down gives up, leaves the VDI as it was, and the same command resumes it', async () => {
    const vdi = (await createVdi(srv.url, 32 * MiB)).id;
    const zeros = await sha256Url(`${srv.url}/v1/vdis/${vdi}/contents?format=raw`);
    const proxy = await linkProxy();
    const args = ['upload', source, '--vdi', vdi, '--chunk-size', '1M', '--parallel', '2'];
    try {
      const first = await runUntilLinkDies(args, proxy, 8 * MiB);
      assert.equal(first.code, 1, first.stderr);
      assert.match(first.stderr, /stays open for \d+ s; run the same command again to resume it/);
      const [entry] = await savedEntries();
      assert.ok(entry, 'the session was saved');
      assert.equal(
        (await fsp.stat(path.join(STATE_DIR, entry))).mode & 0o777,
        0o600,
        'a token is kept private',
      );
      assert.equal(
        await sha256Url(`${srv.url}/v1/vdis/${vdi}/contents?format=raw`),
        zeros,
        'the VDI is unchanged',
      );

      const upBefore = proxy.bytesUp;
      const second = await runCli([...args, '--server', proxy.url, ...RETRY_FAST]);
      assert.equal(second.code, 0, second.stderr);
      assert.match(second.stderr, /resuming upload session/);
      const summary = JSON.parse(second.stdout);
      assert.equal(summary.task.status, 'success');
      assert.ok(summary.bytes_resumed >= 4 * MiB, `resumed with ${summary.bytes_resumed} bytes`);
      const resent = proxy.bytesUp - upBefore;
      assert.ok(
        resent < dataBytes - summary.bytes_resumed + 2 * MiB,
        `the second run sent ${resent} bytes; ${dataBytes} of data, ${summary.bytes_resumed} already there`,
      );
    } finally {
      await proxy.close();
    }
    assert.equal(await sha256Url(`${srv.url}/v1/vdis/${vdi}/contents?format=raw`), await sha256File(source));
    assert.deepEqual(await savedEntries(), [], 'a finished upload leaves nothing saved');
  });

  test('--no-resume cancels the session an earlier run left, and sends everything', async () => {
    const vdi = (await createVdi(srv.url, 32 * MiB)).id;
    const proxy = await linkProxy();
    const args = ['upload', source, '--vdi', vdi, '--chunk-size', '1M'];
    try {
      assert.equal((await runUntilLinkDies(args, proxy, 8 * MiB)).code, 1);
      assert.equal((await savedEntries()).length, 1);
      // Without --no-resume the earlier session would be continued; with it, that session no
      // longer holds the VDI (no VDI_BUSY), and a new one starts from nothing.
      const again = await runCli([...args, '--no-resume', '--server', proxy.url, ...RETRY_FAST]);
      assert.equal(again.code, 0, again.stderr);
      assert.equal(JSON.parse(again.stdout).bytes_resumed, 0);
    } finally {
      await proxy.close();
    }
    assert.equal(await sha256Url(`${srv.url}/v1/vdis/${vdi}/contents?format=raw`), await sha256File(source));
    assert.deepEqual(await savedEntries(), []);
  });

  test('a download whose link stays down keeps what it wrote, and the same command continues it', async () => {
    const out = path.join(dir, 'continued.vhd');
    const proxy = await linkProxy();
    const args = ['download', '--vdi', rawVdi, '--format', 'vhd', '-o', out];
    try {
      const first = await runUntilLinkDies(args, proxy, 6 * MiB);
      assert.equal(first.code, 1, first.stderr);
      assert.match(first.stderr, /are kept; run the same command again to resume/);
      assert.equal((await savedEntries()).length, 1);

      const downBefore = proxy.bytesDown;
      const second = await runCli([...args, '--server', proxy.url, ...RETRY_FAST]);
      assert.equal(second.code, 0, second.stderr);
      const summary = JSON.parse(second.stdout);
      assert.ok(summary.bytes_resumed >= 4 * MiB, `resumed at ${summary.bytes_resumed}`);
      assert.equal(summary.restarts, 0);
      const fetched = proxy.bytesDown - downBefore;
      assert.ok(
        fetched < summary.size - summary.bytes_resumed + MiB,
        `the second run fetched ${fetched} bytes of ${summary.size}, ${summary.bytes_resumed} already written`,
      );
    } finally {
      await proxy.close();
    }
    const whole = path.join(dir, 'whole.vhd');
    await curl(['-o', whole, `${srv.url}/v1/vdis/${rawVdi}/contents?format=vhd`]);
    assert.equal(await sha256File(out), await sha256File(whole), 'byte-identical to one whole export');
    await execFileP('qemu-img', ['compare', '-f', 'raw', '-F', 'vpc', source, out]);
    assert.deepEqual(await savedEntries(), []);
  });

  test('a file started afresh forgets what an earlier run saved: a later resume never trusts stale bytes', async () => {
    const out = path.join(dir, 'restarted.img');
    // One proxy, so one server URL: all three runs are the same command as far as resuming goes.
    const proxy = await linkProxy();
    const args = ['download', '--vdi', rawVdi, '-o', out, '--server', proxy.url];
    try {
      // Run 1 stops with some 8 MiB written and saved.
      assert.equal((await runUntilLinkDies(args.slice(0, -2), proxy, 8 * MiB)).code, 1);
      assert.equal((await savedEntries()).length, 1);
      // Run 2 starts the file over (--no-resume), and is killed (-9) after its first MiB, before any checkpoint.
      proxy.downAt = proxy.bytesUp + proxy.bytesDown + MiB;
      try {
        const run2 = await spawnCliUntil(
          [...args, '--no-resume', '--no-progress', '--retry-delay', '5000'],
          /retry/,
        );
        run2.child.kill('SIGKILL');
        await run2.exited;
      } finally {
        proxy.up();
      }
      // Run 3: what run 1 saved no longer describes the file, so it must not resume from there.
      const run3 = await runCli([...args, ...RETRY_FAST]);
      assert.equal(run3.code, 0, run3.stderr);
      assert.equal(JSON.parse(run3.stdout).bytes_resumed, 0);
    } finally {
      await proxy.close();
    }
    assert.equal(await sha256File(out), await sha256File(source));
    assert.deepEqual(await savedEntries(), []);
  });

  test('Ctrl-C while the link is down stops at once and keeps the upload session; the next run resumes it', async () => {
    const vdi = (await createVdi(srv.url, 32 * MiB)).id;
    const proxy = await linkProxy();
    proxy.downAt = 6 * MiB;
    const args = ['upload', source, '--vdi', vdi, '--server', proxy.url, '--chunk-size', '1M'];
    try {
      const run = await spawnCliUntil([...args, '--no-progress', '--retry-delay', '5000'], /retry/);
      const interruptedAt = Date.now();
      run.child.kill('SIGINT');
      const [code] = await run.exited;
      assert.equal(code, 130, run.out.stderr);
      assert.match(
        run.out.stderr,
        /interrupted; upload session \S+ stays open for \d+ s: run the same command again to resume it, or add --cancel/,
      );
      // The backoff wait (2.5-5 s here) is cut short: Ctrl-C does not wait for the next attempt.
      assert.ok(Date.now() - interruptedAt < 2000, `exited ${Date.now() - interruptedAt} ms after SIGINT`);
      proxy.up();
      const again = await runCli([...args, ...RETRY_FAST]);
      assert.equal(again.code, 0, again.stderr);
      assert.ok(JSON.parse(again.stdout).bytes_resumed > 0, 'the kept session was resumed');
    } finally {
      await proxy.close();
    }
    assert.equal(await sha256Url(`${srv.url}/v1/vdis/${vdi}/contents?format=raw`), await sha256File(source));
  });

  test('an upload of another file into the VDI ends the session an earlier run left for the first', async () => {
    const vdi = (await createVdi(srv.url, 32 * MiB)).id;
    const proxy = await linkProxy();
    try {
      const first = await runUntilLinkDies(
        ['upload', source, '--vdi', vdi, '--chunk-size', '1M'],
        proxy,
        4 * MiB,
      );
      assert.equal(first.code, 1, first.stderr);
    } finally {
      await proxy.close();
    }
    const other = path.join(dir, 'other.img');
    await fsp.writeFile(other, seededBytes(8 * MiB, 5));
    const r = await runCli(['upload', other, '--vdi', vdi, '--server', srv.url, ...RETRY_FAST]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /cancelling upload session \S+, which an earlier run left open for .*source\.img/);
    const expected = Buffer.concat([seededBytes(8 * MiB, 5), Buffer.alloc(24 * MiB)]);
    assert.equal(
      await sha256Url(`${srv.url}/v1/vdis/${vdi}/contents?format=raw`),
      createHash('sha256').update(expected).digest('hex'),
    );
  });

  test('a download refused for a wrong token keeps its position for the run that has the right one', async () => {
    const tokenDir = await tempDir('diskport-cli-token-');
    const guarded = await spawnServer(path.join(tokenDir, 'data'), ['--token', 's3cret']);
    try {
      const auth = { authorization: 'Bearer s3cret' };
      const created = await api<{ id: string }>(
        guarded.url,
        'POST',
        '/v1/vdis',
        { name_label: 'guarded', virtual_size: 32 * MiB },
        auth,
      );
      const vdi = created.body.id;
      const up = await runCli(['upload', source, '--vdi', vdi, '--server', guarded.url, ...RETRY_FAST], {
        DISKPORT_TOKEN: 's3cret',
      });
      assert.equal(up.code, 0, up.stderr);
      const out = path.join(tokenDir, 'guarded.img');
      const proxy = await cutProxy(guarded.url, {
        seed: 0,
        cutConnections: 0,
        direction: 'down',
        minBytes: 0,
        maxBytes: 0,
      });
      const args = ['download', '--vdi', vdi, '-o', out];
      try {
        const first = await runUntilLinkDies([...args, '--token', 's3cret'], proxy, 6 * MiB);
        assert.equal(first.code, 1, first.stderr);
        const wrong = await runCli([...args, '--token', 'nope', '--server', proxy.url, ...RETRY_FAST]);
        assert.equal(wrong.code, 1, wrong.stderr);
        assert.match(wrong.stderr, /403|token/i);
        assert.equal((await savedEntries()).length, 1, 'the position is kept');
        const right = await runCli([...args, '--token', 's3cret', '--server', proxy.url, ...RETRY_FAST]);
        assert.equal(right.code, 0, right.stderr);
        assert.ok(JSON.parse(right.stdout).bytes_resumed > 0);
      } finally {
        await proxy.close();
      }
      assert.equal(await sha256File(out), await sha256File(source));
    } finally {
      await guarded.stop();
      await fsp.rm(tokenDir, { recursive: true, force: true });
    }
  });

  test('a second run into a VDI that a live run is uploading into is refused, and leaves it alone', async () => {
    const vdi = (await createVdi(srv.url, 32 * MiB)).id;
    const proxy = await linkProxy();
    proxy.downAt = 4 * MiB;
    try {
      // Run A: its link is down; it waits to retry, alive.
      const a = await spawnCliUntil(
        ['upload', source, '--vdi', vdi, '--server', proxy.url, '--no-progress', '--retry-delay', '20000'],
        /retry/,
      );
      const other = path.join(dir, 'other-live.img');
      await fsp.writeFile(other, seededBytes(MiB, 9));
      const b = await runCli(['upload', other, '--vdi', vdi, '--server', srv.url, ...RETRY_FAST]);
      assert.equal(b.code, 1, b.stderr);
      assert.match(b.stderr, new RegExp(`another diskport run \\(pid ${a.child.pid}\\) is uploading`));
      // A's session is still open: B did not cancel it.
      const sessions = await api<{ state: string }[]>(srv.url, 'GET', `/v1/transfers?vdi=${vdi}`);
      assert.ok(
        sessions.body.some((t) => t.state === 'open'),
        JSON.stringify(sessions.body),
      );
      // A's Ctrl-C keeps its session for a later run; --cancel ends it and forgets it.
      proxy.up();
      a.child.kill('SIGINT');
      assert.equal((await a.exited)[0], 130);
      assert.equal((await savedEntries()).length, 1);
      const cancel = await runCli(['upload', source, '--vdi', vdi, '--server', srv.url, '--cancel']);
      assert.equal(cancel.code, 0, cancel.stderr);
      assert.deepEqual(await savedEntries(), []);
    } finally {
      await proxy.close();
    }
  });

  test('a state directory that cannot be written costs resumability, not the upload', async () => {
    const vdi = (await createVdi(srv.url, 32 * MiB)).id;
    const r = await runCli(['upload', source, '--vdi', vdi, '--server', srv.url, ...RETRY_FAST], {
      DISKPORT_STATE_DIR: '/dev/null/diskport',
    });
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /cannot save this run's state in \/dev\/null\/diskport/);
    assert.equal(await sha256Url(`${srv.url}/v1/vdis/${vdi}/contents?format=raw`), await sha256File(source));
  });

  test('Ctrl-C during a download saves where it got to; the next run continues from there', async () => {
    const out = path.join(dir, 'interrupted.img');
    // The first connection breaks after 1-2 MiB: the CLI is waiting to retry when it is interrupted.
    const proxy = await cutProxy(srv.url, {
      seed: 83,
      cutConnections: 1,
      direction: 'down',
      minBytes: MiB,
      maxBytes: 2 * MiB,
    });
    const args = ['download', '--vdi', rawVdi, '-o', out, '--server', proxy.url, '--no-progress', '--json'];
    try {
      const run = await spawnCliUntil([...args, '--retry-delay', '5000'], /retry/);
      const interruptedAt = Date.now();
      run.child.kill('SIGINT');
      const [code] = await run.exited;
      const stderr = run.out.stderr;
      assert.equal(code, 130, stderr);
      assert.match(stderr, /are kept; run the same command again to resume/);
      // The backoff wait (2.5-5 s here) is cut short: Ctrl-C does not wait for the next attempt.
      assert.ok(Date.now() - interruptedAt < 2000, `exited ${Date.now() - interruptedAt} ms after SIGINT`);

      const downBefore = proxy.bytesDown;
      const again = await runCli(args);
      assert.equal(again.code, 0, again.stderr);
      const summary = JSON.parse(again.stdout);
      assert.ok(summary.bytes_resumed >= 512 * 1024, `resumed at ${summary.bytes_resumed}`);
      assert.ok(proxy.bytesDown - downBefore < 32 * MiB - summary.bytes_resumed + MiB);
    } finally {
      await proxy.close();
    }
    assert.equal(await sha256File(out), await sha256File(source));
    assert.deepEqual(await savedEntries(), []);
  });

  test('diskport --help and each command --help document every flag', async () => {
    const top = await runCli(['--help']);
    assert.equal(top.code, 0);
    for (const word of ['upload', 'download', 'DISKPORT_SERVER', 'DISKPORT_TOKEN', 'DISKPORT_STATE_DIR'])
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
      '--no-resume',
      '--state-dir',
      '--cancel',
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
      '--no-resume',
      '--state-dir',
    ]) {
      assert.ok(down.stdout.includes(flag), `download --help lacks ${flag}`);
    }
  });

  test('Ctrl-C stops an upload and keeps its session, without a word of TRANSFER_NOT_ACTIVE; the same command resumes it', async () => {
    const vdi = (await createVdi(srv.url, 32 * MiB)).id;
    // Every connection breaks after a few KiB: the CLI is retrying, chunks in flight, when it is interrupted.
    const proxy = await cutProxy(srv.url, {
      seed: 61,
      cutConnections: 1000,
      direction: 'up',
      minBytes: 16 * 1024,
      maxBytes: 32 * 1024,
    });
    const args = ['upload', source, '--vdi', vdi];
    try {
      const run = await spawnCliUntil(
        [...args, '--server', proxy.url, '--no-progress', '--retry-delay', '500'],
        /retry/,
      );
      run.child.kill('SIGINT');
      const [code] = await run.exited;
      const stderr = run.out.stderr;
      assert.equal(code, 130, stderr);
      assert.match(stderr, /interrupted; upload session \S+ stays open/);
      assert.doesNotMatch(stderr, /TRANSFER_NOT_ACTIVE|cancelling/);
    } finally {
      await proxy.close();
    }
    const [entry] = await savedEntries();
    assert.ok(entry, 'the session is saved for the next run');
    const sessions = await api<{ state: string }[]>(srv.url, 'GET', `/v1/transfers?vdi=${vdi}`);
    assert.deepEqual(
      sessions.body.map((t) => t.state),
      ['open'],
    );
    // The same command, on a good link this time, continues that session rather than starting over.
    const again = await runCli([...args, '--server', srv.url, ...RETRY_FAST]);
    assert.equal(again.code, 0, again.stderr);
    assert.match(again.stderr, /resuming upload session/);
    assert.equal(await sha256Url(`${srv.url}/v1/vdis/${vdi}/contents?format=raw`), await sha256File(source));
    assert.deepEqual(await savedEntries(), []);
  });

  test('upload --cancel ends the session an interrupted run kept: the VDI is free and as it was', async () => {
    const vdi = (await createVdi(srv.url, 32 * MiB)).id;
    const zeros = await sha256Url(`${srv.url}/v1/vdis/${vdi}/contents?format=raw`);
    const args = ['upload', source, '--vdi', vdi, '--server', srv.url];
    const none = await runCli([...args, '--cancel']);
    assert.equal(none.code, 1, 'nothing to cancel yet');
    assert.match(none.stderr, /no upload into VDI \S+ was left open by an earlier run/);

    const proxy = await linkProxy();
    proxy.downAt = 4 * MiB;
    try {
      const run = await spawnCliUntil(
        ['upload', source, '--vdi', vdi, '--server', proxy.url, '--no-progress', '--retry-delay', '5000'],
        /retry/,
      );
      run.child.kill('SIGTERM');
      assert.equal((await run.exited)[0], 130, run.out.stderr);
    } finally {
      await proxy.close();
    }
    const busy = await api<{ error: { code: string } }>(srv.url, 'POST', '/v1/transfers', {
      vdi,
      direction: 'upload',
    });
    assert.equal(busy.status, 409, 'the kept session holds the VDI');
    assert.equal(busy.body.error.code, 'VDI_BUSY');

    const cancel = await runCli([...args, '--cancel']);
    assert.equal(cancel.code, 0, cancel.stderr);
    assert.match(
      cancel.stderr,
      /cancelled upload session \S+ \(.*source\.img\); VDI \S+ is as it was, and free/,
    );
    assert.deepEqual(await savedEntries(), []);
    const free = await api<{ id: string }>(srv.url, 'POST', '/v1/transfers', { vdi, direction: 'upload' });
    assert.equal(free.status, 201, 'the VDI is not left busy');
    await api(srv.url, 'DELETE', `/v1/transfers/${free.body.id}`);
    assert.equal(await sha256Url(`${srv.url}/v1/vdis/${vdi}/contents?format=raw`), zeros);
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

describe('the diskport CLI and a server out of space', () => {
  test('a 507 is an answer, not retried: the run stops, its session stays, and the same command resumes once there is room', async () => {
    const dir = await tempDir('diskport-cli-full-');
    // In this process, so that a write can fail as a full disk fails it.
    const srv = await startServer({ dataDir: path.join(dir, 'data') });
    try {
      const file = path.join(dir, 'full.img');
      await fsp.writeFile(file, seededBytes(16 * MiB, 77));
      const vdi = (await createVdi(srv.url, 16 * MiB)).id;
      const args = [
        'upload',
        file,
        '--vdi',
        vdi,
        '--server',
        srv.url,
        '--chunk-size',
        '8M',
        '--parallel',
        '1',
      ];
      // A write of the second chunk fails as a full disk fails it.
      const fault = failNthDirectWrite(3);
      let first: CliResult;
      try {
        first = await runCli([...args, ...RETRY_FAST]);
      } finally {
        fault.restore();
      }
      assert.equal(first.code, 1, first.stderr);
      assert.match(
        first.stderr,
        /the server is out of space; upload session \S+ stays open for \d+ s: free space there/,
      );
      assert.match(first.stderr, /INSUFFICIENT_SPACE/);
      // The second chunk is two 4 MiB writes, the first of them failing; with two writes in
      // flight the other may have gone out too. A chunk sent again would make a fifth.
      assert.ok(
        fault.writes === 3 || fault.writes === 4,
        `the chunk was not sent again (${fault.writes} writes)`,
      );
      const again = await runCli([...args, ...RETRY_FAST]);
      assert.equal(again.code, 0, again.stderr);
      // What landed before the disk filled up is not sent again.
      assert.ok(JSON.parse(again.stdout).bytes_resumed > 0, again.stdout);
      assert.equal(await sha256Url(`${srv.url}/v1/vdis/${vdi}/contents?format=raw`), await sha256File(file));
    } finally {
      await srv.close();
      await fsp.rm(dir, { recursive: true, force: true });
      await fsp.rm(STATE_DIR, { recursive: true, force: true });
    }
  });
});
