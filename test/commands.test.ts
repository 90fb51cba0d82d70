/**
 * The two commands as a newcomer runs them from a checkout: `npx diskport`
 * and `npx diskport-server` (the package's bins, built by `npm ci`), their
 * `--version`, `npm start` (which runs the build, never compiles), and a
 * server started on a port that is already taken.
 */
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, promises as fsp, statSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import { databaseUrlFor } from './helpers/pg.js';
import { ROOT, tempDir } from './helpers/server.js';
import { waitFor } from './helpers/wait.js';

const execFileP = promisify(execFile);

const pkg = JSON.parse(await fsp.readFile(path.join(ROOT, 'package.json'), 'utf8')) as {
  version: string;
  bin: Record<string, string>;
  scripts: Record<string, string>;
};

/** Runs a command to its end; a non-zero exit is a result here, not an error. */
async function run(
  cmd: string,
  args: string[],
  env: Record<string, string> = {},
): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const child = spawn(cmd, args, { cwd: ROOT, env: { ...process.env, ...env }, stdio: 'pipe' });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d) => {
    stdout += d;
  });
  child.stderr.on('data', (d) => {
    stderr += d;
  });
  const [code] = (await once(child, 'close')) as [number | null];
  return { code, stdout, stderr };
}

const fromSource = (entry: string, args: string[]) =>
  run(process.execPath, ['--import', 'tsx', path.join(ROOT, entry), ...args]);

describe('the commands from a checkout', () => {
  test('diskport-server --version and diskport --version print the package version', async () => {
    for (const entry of ['src/main.ts', 'src/cli/main.ts']) {
      const r = await fromSource(entry, ['--version']);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.stdout.trim(), pkg.version, entry);
    }
  });

  // A checkout where `npm ci` has not run since the bins' build was added builds them here: tsc takes a while.
  test('npm ci builds the bins, and npx diskport / npx diskport-server run them', {
    timeout: 300_000,
  }, async () => {
    // `prepare` runs at the end of `npm ci`: a fresh checkout has its bins built.
    assert.match(pkg.scripts.prepare ?? '', /npm run build/);
    if (!existsSync(path.join(ROOT, pkg.bin.diskport))) {
      await execFileP('npm', ['run', 'build'], { cwd: ROOT });
    }
    for (const bin of ['diskport', 'diskport-server']) {
      const r = await run('npx', ['--no-install', bin, '--version']);
      assert.equal(r.code, 0, `${bin}: ${r.stderr}`);
      assert.equal(r.stdout.trim(), pkg.version, bin);
    }
    const help = await run('npx', ['--no-install', 'diskport', 'upload', '--help']);
    assert.equal(help.code, 0, help.stderr);
    assert.match(help.stdout, /--vdi/);
  });

  // `npm start` once compiled TypeScript before every start (12.8 s to the first /healthz on
  // 2 cores); the build is `npm ci`'s (prepare) and `npm run build`'s job.
  test('npm start serves /healthz from the build without compiling', { timeout: 300_000 }, async () => {
    const main = path.join(ROOT, 'dist/main.js');
    if (!existsSync(main)) await execFileP('npm', ['run', 'build'], { cwd: ROOT });
    const builtAt = statSync(main).mtimeMs;
    const dir = await tempDir('diskport-start-');
    const probe = net.createServer().listen(0, '127.0.0.1');
    await once(probe, 'listening');
    const port = (probe.address() as net.AddressInfo).port;
    await new Promise((r) => probe.close(r));
    // its own process group: npm, its shell and the server end together
    const data = path.join(dir, 'data');
    const databaseUrl = databaseUrlFor(data);
    const child = spawn(
      'npm',
      [
        ...['start', '--silent', '--', '--port', String(port), '--data-dir', data],
        ...(databaseUrl ? ['--database-url', databaseUrl] : []),
      ],
      { cwd: ROOT, detached: true, stdio: 'ignore' },
    );
    const exited = once(child, 'exit');
    try {
      await waitFor(
        'npm start to answer /healthz',
        async () => {
          assert.equal(child.exitCode, null, 'npm start exited');
          const res = await fetch(`http://127.0.0.1:${port}/healthz`).catch(() => null);
          return res?.status === 200;
        },
        { timeoutMs: 120_000 },
      );
      assert.equal(statSync(main).mtimeMs, builtAt, 'npm start rewrote dist/main.js: it compiled');
    } finally {
      if (child.exitCode === null) process.kill(-child.pid!, 'SIGTERM');
      await exited;
      await fsp.rm(dir, { recursive: true, force: true });
    }
  });

  describe('a port already in use', () => {
    let holder: net.Server;
    let port: number;
    let dir: string;
    before(async () => {
      dir = await tempDir('diskport-port-');
      holder = net.createServer().listen(0, '127.0.0.1');
      await once(holder, 'listening');
      port = (holder.address() as net.AddressInfo).port;
    });
    after(async () => {
      await new Promise((r) => holder.close(r));
      await fsp.rm(dir, { recursive: true, force: true });
    });

    test('is said in one line, exit status 1, and the data directory is left alone', async () => {
      const data = path.join(dir, 'data');
      const r = await fromSource('src/main.ts', ['--port', String(port), '--data-dir', data]);
      assert.equal(r.code, 1, r.stderr);
      const lines = r.stderr.trim().split('\n');
      assert.equal(lines.length, 1, r.stderr);
      assert.match(
        lines[0],
        new RegExp(`^diskport: cannot listen on 127\\.0\\.0\\.1:${port}: the port is already in use`),
      );
      assert.match(lines[0], /--port/);
      assert.doesNotMatch(r.stderr, /\n\s+at /, 'no stack trace');
      assert.equal(existsSync(data), false, 'nothing was opened before the port was known to be free');
    });
  });
});
