/**
 * On SQLite a data directory is one node's: a second diskport started on it
 * refuses with a message naming --database-url, and a node killed with -9
 * lets go of it (the lock is the operating system's, held by the process).
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { promises as fsp } from 'node:fs';
import { after, describe, test } from 'node:test';
import { entryArgs } from './helpers/entry.js';
import { ROOT, startServer, tempDir } from './helpers/server.js';

/** `src/main.ts` on SQLite (whatever the test pass's database), until it listens or exits. */
function start(
  dataDir: string,
): Promise<{ url?: string; code?: number | null; stderr: string; kill(): Promise<void> }> {
  const env = { ...process.env };
  delete env.DISKPORT_DATABASE_URL;
  const child = spawn(process.execPath, [...entryArgs('main'), '--port', '0', '--data-dir', dataDir], {
    cwd: ROOT,
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  let out = '';
  child.stderr.on('data', (d) => {
    stderr += d;
  });
  const kill = async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    const exited = once(child, 'exit');
    child.kill('SIGKILL');
    await exited;
  };
  return new Promise((resolve) => {
    child.stdout.on('data', (d) => {
      out += d;
      const m = /listening on (http:\/\/[\d.]+:\d+)/.exec(out);
      if (m) resolve({ url: m[1], stderr, kill });
    });
    child.once('exit', (code) => resolve({ code, stderr, kill }));
  });
}

describe('one diskport per data directory on SQLite', () => {
  const dirs: string[] = [];
  after(async () => {
    for (const d of dirs) await fsp.rm(d, { recursive: true, force: true });
  });

  test('a second process on the same data directory refuses to start and says to use --database-url', async () => {
    const dataDir = await tempDir();
    dirs.push(dataDir);
    const first = await start(dataDir);
    assert.ok(first.url, first.stderr);
    try {
      const second = await start(dataDir);
      assert.equal(second.url, undefined, 'the second node must not serve');
      assert.equal(second.code, 1);
      assert.match(second.stderr, /data directory .* is in use by another diskport \(pid \d+\)/);
      assert.match(second.stderr, /--database-url/);
      // The first one still serves.
      assert.equal((await fetch(`${first.url}/healthz`)).status, 200);
    } finally {
      await first.kill();
    }
    // Killed with -9, it held the directory no longer.
    const third = await start(dataDir);
    assert.ok(third.url, third.stderr);
    await third.kill();
  });

  test('in one process too: a second set of services on the directory is refused until the first closes', {
    skip: process.env.DISKPORT_TEST_DATABASE_URL ? 'on PostgreSQL nodes may share a data directory' : false,
  }, async () => {
    const dataDir = await tempDir();
    dirs.push(dataDir);
    const first = await startServer({ dataDir });
    try {
      await assert.rejects(startServer({ dataDir }), /in use by another diskport/);
    } finally {
      await first.close();
    }
    const again = await startServer({ dataDir });
    await again.close();
  });
});
