/**
 * The suite on PostgreSQL: with DISKPORT_TEST_DATABASE_URL set (a database
 * whose user may create databases), every test server gets a database of its
 * own, named after its data directory, so a server restarted on the same
 * directory finds its metadata again. They are dropped when the test file's
 * process exits. Without it, servers keep SQLite in their data directory.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import path from 'node:path';
import Database from 'better-sqlite3';

export const TEST_DATABASE_URL = process.env.DISKPORT_TEST_DATABASE_URL || undefined;

/** Why a test that reads SQLite's file itself is skipped on PostgreSQL; false on SQLite. */
export const SQLITE_ONLY: string | false = TEST_DATABASE_URL
  ? "reads SQLite's file, which PostgreSQL has not"
  : false;

const made = new Map<string, string>();

function psql(url: string, ...commands: string[]): void {
  execFileSync('psql', ['-X', '-q', '-v', 'ON_ERROR_STOP=1', url, ...commands.flatMap((c) => ['-c', c])], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
}

/** The database URL of the server on `dataDir` (created at the first call); undefined on SQLite. */
export function databaseUrlFor(dataDir: string): string | undefined {
  if (!TEST_DATABASE_URL) return undefined;
  let url = made.get(dataDir);
  if (url) return url;
  const name = `diskport_t_${createHash('sha256').update(dataDir).digest('hex').slice(0, 20)}`;
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
