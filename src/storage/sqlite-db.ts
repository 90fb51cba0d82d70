/**
 * The embedded backend: SQLite (WAL) through better-sqlite3, the default.
 *
 * synchronous=FULL: a committed transaction survives a kill -9 and a power
 * cut; the write rate here (a few rows per transfer) makes the extra fsync
 * cheap. A running task's progress (once a second) is the exception: it is
 * written without one (Db.relaxedDurability).
 */
import { chmodSync } from 'node:fs';
import Database from 'better-sqlite3';
import { makePrivateFileSync, PRIVATE_FILE_MODE } from '../image/file-io.js';
import type { Db, Migration, Statement } from './db.js';

class SqliteDb implements Db {
  readonly dialect = 'sqlite';
  readonly soleWriter = true;

  constructor(readonly raw: Database.Database) {}

  get inTransaction(): boolean {
    return this.raw.inTransaction;
  }

  prepare(sql: string): Statement {
    return this.raw.prepare(sql);
  }

  transaction<A extends unknown[], T>(fn: (...args: A) => T): (...args: A) => T {
    return this.raw.transaction(fn) as unknown as (...args: A) => T;
  }

  exec(sql: string): void {
    this.raw.exec(sql);
  }

  relaxedDurability<T>(fn: () => T): T {
    if (this.raw.inTransaction) return fn();
    this.raw.pragma('synchronous = NORMAL');
    try {
      return fn();
    } finally {
      this.raw.pragma('synchronous = FULL');
    }
  }

  private totalChanges?: Database.Statement;

  changeCount(): number {
    this.totalChanges ??= this.raw.prepare('SELECT total_changes()').pluck();
    return this.totalChanges.get() as number;
  }

  close(): void {
    this.raw.close();
  }
}

/** better-sqlite3's own handle under a Db, for what only SQLite has (tests of its settings); undefined on another backend. */
export function rawSqlite(db: Db): Database.Database | undefined {
  return db instanceof SqliteDb ? db.raw : undefined;
}

export function openSqliteDb(file: string, migrations: readonly Migration[]): Db {
  // SQLite creates its file world-readable, and its -wal and -shm files with
  // the database's mode: create it private first (and make an older one so).
  makePrivateFileSync(file);
  for (const companion of [`${file}-wal`, `${file}-shm`]) {
    try {
      chmodSync(companion, PRIVATE_FILE_MODE);
    } catch {
      // not there: SQLite creates it with the database's mode
    }
  }
  const raw = new Database(file);
  raw.pragma('journal_mode = WAL');
  raw.pragma('synchronous = FULL');
  raw.pragma('foreign_keys = ON');
  raw.pragma('busy_timeout = 5000');
  const current = raw.pragma('user_version', { simple: true }) as number;
  for (let v = current; v < migrations.length; v++) {
    const m = migrations[v];
    raw.transaction(() => {
      raw.exec(typeof m === 'string' ? m : m.sqlite);
      raw.pragma(`user_version = ${v + 1}`);
    })();
  }
  return new SqliteDb(raw);
}
