/**
 * One process per data directory on SQLite: SQLite's file is one node's
 * metadata, and a second diskport on it would run restart recovery over the
 * first one's running transfers (failing its tasks, freeing its staging
 * files). Several nodes share a data directory only with --database-url.
 *
 * Why a SQLite file held in exclusive locking mode rather than a pid file:
 * the lock is the operating system's (fcntl), held by the open descriptor,
 * so it is let go when the process dies in any way (kill -9 included) and
 * there is no stale file to judge by a pid that may have been reused. The pid
 * beside it only makes the message say who holds it.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import Database from 'better-sqlite3';
import { makePrivateFileSync, PRIVATE_FILE_MODE } from '../image/file-io.js';

export const LOCK_FILE = 'diskport.lock';
const PID_FILE = 'diskport.pid';

/** Another process holds the data directory (diskport on SQLite is one node). */
export class DataDirInUseError extends Error {}

export interface DataDirLock {
  release(): void;
}

/** Takes the data directory for this process, or throws DataDirInUseError. */
export function lockDataDir(dataDir: string): DataDirLock {
  const lockFile = path.join(dataDir, LOCK_FILE);
  makePrivateFileSync(lockFile); // SQLite would create it with the umask's mode
  const db = new Database(lockFile, { timeout: 0 });
  try {
    db.pragma('locking_mode = EXCLUSIVE');
    // The first write takes the exclusive lock, which exclusive mode keeps until close.
    db.exec('BEGIN EXCLUSIVE; CREATE TABLE IF NOT EXISTS holder (pid INTEGER); COMMIT');
  } catch (err) {
    db.close();
    if ((err as { code?: string }).code !== 'SQLITE_BUSY') throw err;
    throw new DataDirInUseError(
      `the data directory ${dataDir} is in use by another diskport${holderPid(dataDir)}: ` +
        "on SQLite a data directory is one node's; to run several nodes over one data directory, " +
        'start each with the same --database-url postgres://… (DISKPORT_DATABASE_URL), ' +
        'or give this one another --data-dir',
    );
  }
  try {
    writeFileSync(path.join(dataDir, PID_FILE), `${process.pid}\n`, { mode: PRIVATE_FILE_MODE });
  } catch {
    // only the message's detail
  }
  return {
    release() {
      if (db.open) db.close();
    },
  };
}

function holderPid(dataDir: string): string {
  try {
    const pid = Number.parseInt(readFileSync(path.join(dataDir, PID_FILE), 'utf8'), 10);
    return Number.isFinite(pid) ? ` (pid ${pid})` : '';
  } catch {
    return '';
  }
}
