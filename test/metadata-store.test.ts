/**
 * The metadata store on each backend: the shared contract on SQLite and on
 * PostgreSQL (when DISKPORT_TEST_DATABASE_URL names one), and what happens
 * over HTTP when PostgreSQL is away: at start-up (a message and exit status
 * 1) and mid-run (503 METADATA_UNAVAILABLE with Retry-After, then service
 * again once it is back).
 */
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { once } from 'node:events';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { ApiError } from '../src/errors.js';
import { openDb } from '../src/storage/db.js';
import { rawSqlite } from '../src/storage/sqlite-db.js';
import { metadataStoreContract } from './contracts/metadata-store.js';
import { entryArgs } from './helpers/entry.js';
import { databaseUrlFor, TEST_DATABASE_URL } from './helpers/pg.js';
import { cutProxy } from './helpers/proxy.js';
import { ROOT, spawnServer, tempDir } from './helpers/server.js';

const dirs: string[] = [];
after(async () => {
  for (const d of dirs) await fsp.rm(d, { recursive: true, force: true });
});

async function freshDir(): Promise<string> {
  const d = await tempDir();
  dirs.push(d);
  return d;
}

function sqliteSchema(file: string): Record<string, string[]> {
  const db = openDb(file);
  const raw = rawSqlite(db)!;
  const tables = raw.prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name").all() as {
    name: string;
  }[];
  const schema = Object.fromEntries(
    tables.map(({ name }) => [
      name,
      (
        raw.prepare(`SELECT name FROM pragma_table_info(?) ORDER BY name`).all(name) as { name: string }[]
      ).map((c) => c.name),
    ]),
  );
  db.close();
  return schema;
}

const reference = sqliteSchema(path.join(await freshDir(), 'reference.sqlite'));

metadataStoreContract(
  'SQLite',
  async () => {
    const file = path.join(await freshDir(), 'meta.sqlite');
    return { db: openDb(file), schema: () => sqliteSchema(file), dispose: () => {} };
  },
  reference,
);

if (TEST_DATABASE_URL) {
  metadataStoreContract(
    'PostgreSQL',
    async () => {
      const url = databaseUrlFor(await freshDir()) as string;
      const db = openDb({ file: '', databaseUrl: url });
      return {
        db,
        schema: () => {
          const rows = db
            .prepare(
              `SELECT table_name AS t, column_name AS c FROM information_schema.columns
               WHERE table_schema = 'public' AND table_name <> 'diskport_schema' ORDER BY table_name, column_name`,
            )
            .all() as { t: string; c: string }[];
          const schema: Record<string, string[]> = {};
          for (const { t, c } of rows) schema[t] = [...(schema[t] ?? []), c];
          return schema;
        },
        dispose: () => {},
      };
    },
    reference,
  );
} else {
  test('metadata store contract: PostgreSQL', { skip: 'DISKPORT_TEST_DATABASE_URL is not set' }, () => {});
}

describe('PostgreSQL away', () => {
  test('at start-up: diskport-server says which database it could not use and exits 1', async () => {
    const child = spawn(
      process.execPath,
      [
        ...entryArgs('main'),
        '--port',
        '0',
        '--data-dir',
        await freshDir(),
        '--database-url',
        'postgres://diskport:s3cret@127.0.0.1:1/diskport',
      ],
      { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let stderr = '';
    child.stderr?.on('data', (d) => {
      stderr += d;
    });
    child.stdout?.resume();
    const [code] = await once(child, 'exit');
    assert.equal(code, 1);
    assert.match(
      stderr,
      /cannot use the PostgreSQL database postgres:\/\/diskport:\*\*\*@127\.0\.0\.1:1\/diskport/,
    );
    assert.match(stderr, /--database-url/);
    assert.doesNotMatch(stderr, /s3cret/);
  });

  test('mid-run: calls fail with 503 METADATA_UNAVAILABLE and Retry-After, and succeed again once it is back', {
    skip: !TEST_DATABASE_URL && 'DISKPORT_TEST_DATABASE_URL is not set',
  }, async () => {
    // diskport reaches PostgreSQL through a link the test can cut, as a network or a restart of the server would.
    const dataDir = await freshDir();
    const direct = new URL(databaseUrlFor(dataDir) as string);
    const link = await cutProxy(`http://${direct.hostname}:${direct.port || 5432}`, {
      seed: 1,
      cutConnections: 0,
      direction: 'up',
      minBytes: 0,
      maxBytes: 0,
    });
    const viaLink = new URL(direct);
    viaLink.port = new URL(link.url).port;
    // Its own process: an in-process server would block the thread the link runs on while it waits for PostgreSQL.
    const srv = await spawnServer(dataDir, ['--database-url', viaLink.toString()]);
    try {
      assert.equal((await fetch(`${srv.url}/v1/vdis`)).status, 200);
      link.down();
      for (let i = 0; i < 2; i++) {
        const res = await fetch(`${srv.url}/v1/vdis`);
        assert.equal(res.status, 503);
        assert.equal(res.headers.get('retry-after'), '5');
        const body = (await res.json()) as { error: { code: string } };
        assert.equal(body.error.code, 'METADATA_UNAVAILABLE');
      }
      link.up();
      assert.equal((await fetch(`${srv.url}/v1/vdis`)).status, 200);
    } finally {
      await srv.stop();
      await link.close();
    }
  });
});

describe('PostgreSQL lost inside a transaction', () => {
  test('the rest of the transaction is not run on a new connection: none of it is applied', {
    skip: !TEST_DATABASE_URL && 'DISKPORT_TEST_DATABASE_URL is not set',
  }, async () => {
    const url = databaseUrlFor(await freshDir()) as string;
    const db = openDb({ file: '', databaseUrl: url });
    try {
      db.exec('CREATE TABLE halves (v INTEGER NOT NULL)');
      const insert = db.prepare('INSERT INTO halves (v) VALUES (?)');
      const write = db.transaction(() => {
        insert.run(1);
        // The server ends the connection (a restart, a fail-over): what diskport's sees is terminated.
        execFileSync('psql', [
          '-X',
          '-q',
          url,
          '-c',
          "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'diskport' AND datname = current_database()",
        ]);
        // Time for the connection's end to reach the worker, as it would between two requests.
        Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 500);
        insert.run(2);
      });
      assert.throws(write, (err: unknown) => err instanceof ApiError && err.code === 'METADATA_UNAVAILABLE');
      // The next call connects again; the transaction left nothing behind, not its second half either.
      assert.deepEqual(db.prepare('SELECT v FROM halves').all(), []);
      db.transaction(() => insert.run(3))();
      assert.deepEqual(db.prepare('SELECT v FROM halves').all(), [{ v: 3 }]);
    } finally {
      db.close();
    }
  });
});
