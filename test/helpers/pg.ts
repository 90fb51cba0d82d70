/**
 * The suite on PostgreSQL: with DISKPORT_TEST_DATABASE_URL set (a database
 * whose user may create databases), every test server gets a database of its
 * own, named after its data directory (and the test file's process), so a
 * server restarted on the same directory finds its metadata again. They are
 * dropped when the test file's process exits. Without it, servers keep
 * SQLite in their data directory. Tests read and write the metadata beside a
 * server with queryAt and execSqlAt, which go to whichever it uses.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import path from 'node:path';
import Database from 'better-sqlite3';

export const TEST_DATABASE_URL = process.env.DISKPORT_TEST_DATABASE_URL || undefined;

/**
 * How many seeded rounds a test runs: `sqlite` in the SQLite pass, `postgres`
 * in the PostgreSQL pass, where each costs more (a round trip per statement,
 * a database per spawned server) while what the rounds exercise is the same
 * code on both stores: the PostgreSQL pass keeps it covered there, the SQLite
 * pass keeps the full count.
 */
export function rounds(sqlite: number, postgres: number): number {
  return TEST_DATABASE_URL ? postgres : sqlite;
}

/**
 * Why a test that is about SQLite itself is skipped on PostgreSQL (false on
 * SQLite): `sqliteOnly('the file's size')` says what of SQLite it checks.
 */
export function sqliteOnly(what: string): string | false {
  return TEST_DATABASE_URL ? `about SQLite (${what}), which the PostgreSQL pass does not use` : false;
}

/** The same, for a test that reads SQLite's file itself. */
export const SQLITE_ONLY: string | false = sqliteOnly('its file');

const made = new Map<string, string>();

function psql(url: string, ...commands: string[]): string {
  return execFileSync(
    'psql',
    ['-X', '-q', '-A', '-t', '-v', 'ON_ERROR_STOP=1', url, ...commands.flatMap((c) => ['-c', c])],
    { stdio: ['ignore', 'pipe', 'pipe'], encoding: 'utf8' },
  );
}

/**
 * The name of the database of `dataDir`'s server: its path and this test
 * process, so two files running side by side never share one, and one file's
 * cleanup at exit drops only its own.
 */
function databaseName(dataDir: string): string {
  const key = `${process.pid}\0${path.resolve(dataDir)}`;
  return `diskport_t_${createHash('sha256').update(key).digest('hex').slice(0, 24)}`;
}

/** The database URL of the server on `dataDir` (created at the first call); undefined on SQLite. */
export function databaseUrlFor(dataDir: string): string | undefined {
  if (!TEST_DATABASE_URL) return undefined;
  let url = made.get(dataDir);
  if (url) return url;
  const name = databaseName(dataDir);
  psql(TEST_DATABASE_URL, `DROP DATABASE IF EXISTS ${name} WITH (FORCE)`, `CREATE DATABASE ${name}`);
  const u = new URL(TEST_DATABASE_URL);
  u.pathname = `/${name}`;
  url = u.toString();
  made.set(dataDir, url);
  return url;
}

process.on('exit', () => {
  if (!TEST_DATABASE_URL || made.size === 0) return;
  const names = [...made.values()].map((u) => new URL(u).pathname.slice(1));
  try {
    psql(TEST_DATABASE_URL, ...names.map((n) => `DROP DATABASE IF EXISTS ${n} WITH (FORCE)`));
  } catch {
    // left for the next run's DROP … IF EXISTS, or the cluster's end
  }
});

/**
 * Runs `sql` on the metadata of the (stopped) server on `dataDir`, wherever
 * it is kept: to leave what a crash at a chosen instant would have left.
 */
export function execSqlAt(dataDir: string, sql: string): void {
  const url = databaseUrlFor(dataDir);
  if (url) {
    psql(url, sql);
    return;
  }
  const db = new Database(path.join(dataDir, 'diskport.sqlite'));
  try {
    db.exec(sql);
  } finally {
    db.close();
  }
}

/** `value` as an SQL literal, for psql, which takes no parameters. */
function literal(value: unknown): string {
  if (value === null || value === undefined) return 'NULL';
  if (typeof value === 'number' || typeof value === 'bigint') return String(value);
  if (typeof value === 'boolean') return value ? '1' : '0';
  return `'${String(value).replaceAll("'", "''")}'`;
}

/**
 * The rows `sql` (one SELECT, `?` for each of `params`) finds in the metadata
 * of the server on `dataDir`, read by a connection of the test's own, beside
 * the running server: SQLite's file or the test's PostgreSQL database. Numbers
 * come back as numbers on both (BIGINT included), as the stores read them.
 */
export function queryAt<T = Record<string, unknown>>(
  dataDir: string,
  sql: string,
  ...params: unknown[]
): T[] {
  const url = databaseUrlFor(dataDir);
  if (url) {
    let i = 0;
    const text = sql.replace(/\?/g, () => literal(params[i++]));
    const out = psql(url, `SELECT coalesce(json_agg(q), '[]') FROM (${text}) q`);
    return JSON.parse(out) as T[];
  }
  const db = new Database(path.join(dataDir, 'diskport.sqlite'), { readonly: true, fileMustExist: true });
  try {
    return db.prepare(sql).all(...params) as T[];
  } finally {
    db.close();
  }
}

/**
 * Every row of every table in the metadata of the server on `dataDir`, as
 * one string: equal before and after means nothing was written there. A
 * node's heartbeat is left out: it is written every --heartbeat on
 * PostgreSQL whatever the requests, to say the node is alive.
 */
export function storeRows(dataDir: string): string {
  const tables = databaseUrlFor(dataDir)
    ? queryAt<{ name: string }>(
        dataDir,
        "SELECT tablename AS name FROM pg_tables WHERE schemaname = 'public'",
      )
    : queryAt<{ name: string }>(dataDir, "SELECT name FROM sqlite_master WHERE type = 'table'");
  return tables
    .map((t) => t.name)
    .sort()
    .map(
      (name) =>
        `${name}: ${queryAt(dataDir, `SELECT * FROM ${name}`)
          .map((r) => JSON.stringify(name === 'nodes' ? { ...r, heartbeat_at: undefined } : r))
          .sort()
          .join('\n')}`,
    )
    .join('\n');
}
