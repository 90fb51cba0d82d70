/**
 * A running task's progress is written once a second without an fsync (the
 * fsync stalled every transfer behind an import's writes); its state changes
 * keep theirs. The real store (SQLite's file, or a PostgreSQL database in
 * the PostgreSQL pass), read back through a second connection.
 */
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, test } from 'node:test';
import { openDb } from '../src/storage/db.js';
import { rawSqlite } from '../src/storage/sqlite-db.js';
import { type Task, TaskStore } from '../src/tasks/task-store.js';
import { databaseUrlFor, queryAt } from './helpers/pg.js';
import { tempDir } from './helpers/server.js';

const dirs: string[] = [];
after(async () => {
  for (const d of dirs) await fsp.rm(d, { recursive: true, force: true });
});

function task(id: string): Task {
  const now = new Date().toISOString();
  return {
    id,
    type: 'import',
    status: 'running',
    progress: 0,
    bytes_done: 0,
    bytes_total: 1000,
    vdi: null,
    created_at: now,
    started_at: now,
    finished_at: null,
    error: null,
    result: null,
  };
}

test('progress is recorded for other readers, and later commits are fsynced again', async () => {
  const dir = await tempDir('diskport-progress-');
  dirs.push(dir);
  const db = openDb({ file: path.join(dir, 'diskport.sqlite'), databaseUrl: databaseUrlFor(dir) });
  /** Whether a commit waits for the disk: SQLite's synchronous=FULL (2), PostgreSQL's synchronous_commit. */
  const durable = () =>
    db.dialect === 'postgres'
      ? (db.prepare("SELECT current_setting('synchronous_commit') AS s").get() as { s: string }).s === 'on'
      : rawSqlite(db)?.pragma('synchronous', { simple: true }) === 2;
  const store = new TaskStore(db);
  const t = task('00000000-0000-4000-8000-000000000001');
  store.insert(t);
  store.updateProgress({ ...t, bytes_done: 400, progress: 0.4 });

  assert.deepEqual(queryAt(dir, 'SELECT bytes_done, progress FROM tasks WHERE id = ?', t.id), [
    { bytes_done: 400, progress: 0.4 },
  ]);
  // What decides a transfer's fate (commit, failure) is still durable when it returns.
  assert.ok(durable());

  // inside a transaction the statement joins it and the setting is left alone
  db.transaction(() => store.updateProgress({ ...t, bytes_done: 500, progress: 0.5 }))();
  assert.ok(durable());
  assert.equal(store.get(t.id)?.bytes_done, 500);
  db.close();
});
