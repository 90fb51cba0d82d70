/**
 * A running task's progress is written once a second without an fsync (the
 * fsync stalled every transfer behind an import's writes); its state changes
 * keep theirs. Real SQLite files, read back through a second connection.
 */
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, test } from 'node:test';
import Database from 'better-sqlite3';
import { openDb } from '../src/storage/db.js';
import { rawSqlite } from '../src/storage/sqlite-db.js';
import { type Task, TaskStore } from '../src/tasks/task-store.js';
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
  const file = path.join(dir, 'meta.db');
  const db = openDb(file);
  const store = new TaskStore(db);
  const t = task('00000000-0000-4000-8000-000000000001');
  store.insert(t);
  store.updateProgress({ ...t, bytes_done: 400, progress: 0.4 });

  const reader = new Database(file, { readonly: true });
  try {
    const row = reader.prepare('SELECT bytes_done, progress FROM tasks WHERE id = ?').get(t.id);
    assert.deepEqual(row, { bytes_done: 400, progress: 0.4 });
  } finally {
    reader.close();
  }
  // 2 = FULL: what decides a transfer's fate (commit, failure) is still durable when it returns
  assert.equal(rawSqlite(db)?.pragma('synchronous', { simple: true }), 2);

  // inside a transaction the statement joins it and the setting is left alone
  db.transaction(() => store.updateProgress({ ...t, bytes_done: 500, progress: 0.5 }))();
  assert.equal(rawSqlite(db)?.pragma('synchronous', { simple: true }), 2);
  assert.equal(store.get(t.id)?.bytes_done, 500);
  db.close();
});
