/**
 * The contract every metadata backend keeps (the shape of tus-node-server's
 * shared store tests): the same statements, run through `Db` and the real
 * stores, give the same rows, counts, orders and transaction outcomes on
 * SQLite and on PostgreSQL. A new backend passes these before anything is
 * built on it.
 */
import assert from 'node:assert/strict';
import { afterEach, beforeEach, describe, it } from 'node:test';
import type { Db } from '../../src/storage/db.js';
import { type Task, TaskStore } from '../../src/tasks/task-store.js';

export interface StoreFixture {
  /** A freshly migrated, empty store. */
  db: Db;
  /** Every table and its columns, by name, as the backend's catalogue has them. */
  schema(): Record<string, string[]>;
  dispose(): Promise<void> | void;
}

/** The schema the migrations must make on every backend, from the SQLite one. */
export type SchemaReference = Record<string, string[]>;

const SR = {
  id: 'local',
  name_label: 'Local',
  path: '/srv/local',
  formats: 'raw',
  def: 'raw',
  at: '2026-01-01T00:00:00.000Z',
};

function task(n: number, status: Task['status'], createdAt: string): Task {
  return {
    id: `00000000-0000-4000-8000-${String(n).padStart(12, '0')}`,
    type: 'import',
    status,
    progress: 0,
    bytes_done: 0,
    bytes_total: null,
    vdi: null,
    created_at: createdAt,
    started_at: null,
    finished_at: status === 'running' ? null : createdAt,
    error: null,
    result: null,
  };
}

export function metadataStoreContract(
  name: string,
  open: () => Promise<StoreFixture>,
  reference?: SchemaReference,
): void {
  describe(`metadata store contract: ${name}`, () => {
    let f: StoreFixture;
    let db: Db;
    beforeEach(async () => {
      f = await open();
      db = f.db;
      db.prepare(
        'INSERT INTO srs (id, name_label, path, supported_image_formats, default_image_format, created_at) VALUES (?, ?, ?, ?, ?, ?)',
      ).run(SR.id, SR.name_label, SR.path, SR.formats, SR.def, SR.at);
    });
    afterEach(async () => {
      db.close();
      await f.dispose();
    });

    const insertVdi = (id: string, size: number, createdAt = '2026-01-02T00:00:00.000Z') =>
      db
        .prepare(
          `INSERT INTO vdis (id, sr_id, name_label, virtual_size, image_format, file_name, created_at, content_updated_at, content_id)
           VALUES (@id, @sr, @label, @size, 'raw', @id, @at, @at, @id)`,
        )
        .run({ id, sr: 'local', label: `disk ${id}`, size, at: createdAt });

    it('the migrations make the same tables and columns', {
      skip: !reference && 'no reference schema',
    }, () => {
      assert.deepEqual(f.schema(), reference);
    });

    it('reads rows as stored: 64-bit integers as numbers, reals, text, NULL; no row as undefined', () => {
      const big = 64 * 1024 ** 4 - 512;
      insertVdi('a', big);
      const row = db
        .prepare('SELECT virtual_size, generation, snapshot_of, name_label FROM vdis WHERE id = ?')
        .get('a');
      assert.deepEqual(
        { ...(row as object) },
        { virtual_size: big, generation: 0, snapshot_of: null, name_label: 'disk a' },
      );
      assert.equal(db.prepare('SELECT * FROM vdis WHERE id = ?').get('nope'), undefined);
      const { n } = db.prepare('SELECT COUNT(*) AS n FROM vdis').get() as { n: number };
      assert.equal(n, 1);
      const store = new TaskStore(db);
      store.insert({
        ...task(1, 'running', '2026-01-01T00:00:00.000Z'),
        progress: 0.25,
        bytes_done: 2 ** 40,
      });
      const t = store.get(task(1, 'running', '').id);
      assert.equal(t?.progress, 0.25);
      assert.equal(t?.bytes_done, 2 ** 40);
    });

    it('binds ? positionally and @name by name, the same name twice', () => {
      insertVdi('a', 512);
      insertVdi('b', 1024);
      const rows = db
        .prepare('SELECT id FROM vdis WHERE virtual_size >= ? AND id != ? ORDER BY id')
        .all(512, 'b');
      assert.deepEqual(
        rows.map((r) => (r as { id: string }).id),
        ['a'],
      );
      const named = db
        .prepare('SELECT id FROM vdis WHERE file_name = @id AND content_id = @id')
        .get({ id: 'b', unused: 1 }) as { id: string };
      assert.equal(named.id, 'b');
    });

    it('counts the rows a write changed, and INSERT OR IGNORE ignores a duplicate', () => {
      insertVdi('a', 512);
      insertVdi('b', 512);
      assert.equal(
        db.prepare('UPDATE vdis SET name_label = ? WHERE virtual_size = ?').run('x', 512).changes,
        2,
      );
      assert.equal(db.prepare('DELETE FROM vdis WHERE id = ?').run('nope').changes, 0);
      db.prepare(
        "INSERT INTO disk_sets (id, name_label, created_at) VALUES ('s', 'set', '2026-01-01')",
      ).run();
      const add = db.prepare(
        'INSERT OR IGNORE INTO disk_set_members (set_id, vdi_id, added_at) VALUES (?, ?, ?)',
      );
      assert.equal(add.run('s', 'a', 'now').changes, 1);
      assert.equal(add.run('s', 'a', 'now').changes, 0);
    });

    it('IS NOT ? is null-safe', () => {
      insertVdi('a', 512);
      const count = (v: string | null) =>
        (
          db.prepare('SELECT COUNT(*) AS n FROM vdis WHERE content_id = ? AND id IS NOT ?').get('a', v) as {
            n: number;
          }
        ).n;
      assert.equal(count(null), 1);
      assert.equal(count('a'), 0);
      assert.equal(count('b'), 1);
    });

    it('an upsert by ON CONFLICT updates the row in place', () => {
      const upsert = db.prepare(
        `INSERT INTO srs (id, name_label, path, supported_image_formats, default_image_format, created_at)
         VALUES (@id, @id, @path, 'raw', 'raw', 'now') ON CONFLICT(id) DO UPDATE SET path=@path`,
      );
      upsert.run({ id: 'fast', path: '/a' });
      upsert.run({ id: 'fast', path: '/b' });
      assert.deepEqual(
        { ...(db.prepare("SELECT path FROM srs WHERE id = 'fast'").get() as object) },
        { path: '/b' },
      );
    });

    it('enforces foreign keys', () => {
      assert.throws(() =>
        db
          .prepare(
            `INSERT INTO vdis (id, sr_id, name_label, virtual_size, image_format, file_name, created_at, content_updated_at)
             VALUES ('x', 'no-such-sr', 'x', 1, 'raw', 'x', 'now', 'now')`,
          )
          .run(),
      );
    });

    it('a transaction commits as one, rolls back whole on a throw, and a nested one alone', () => {
      const result = db.transaction((id: string) => {
        insertVdi(id, 512);
        assert.equal(db.inTransaction, true);
        return 'done';
      })('a');
      assert.equal(result, 'done');
      assert.equal(db.inTransaction, false);
      assert.throws(
        () =>
          db.transaction(() => {
            insertVdi('b', 512);
            throw new Error('boom');
          })(),
        /boom/,
      );
      db.transaction(() => {
        insertVdi('c', 512);
        assert.throws(() =>
          db.transaction(() => {
            insertVdi('d', 512);
            throw new Error('inner');
          })(),
        );
      })();
      const ids = db.prepare('SELECT id FROM vdis ORDER BY id').all() as { id: string }[];
      assert.deepEqual(
        ids.map((r) => r.id),
        ['a', 'c'],
      );
    });

    it('a failed statement inside a transaction can be caught by an inner one and the outer goes on', () => {
      insertVdi('a', 512);
      db.transaction(() => {
        assert.throws(() => db.transaction(() => insertVdi('a', 512))());
        insertVdi('b', 512);
      })();
      assert.equal((db.prepare('SELECT COUNT(*) AS n FROM vdis').get() as { n: number }).n, 2);
    });

    it('pages newest first by (created_at, seq): ties keep the order of insertion, every row once', () => {
      const store = new TaskStore(db);
      const same = '2026-01-03T00:00:00.000Z';
      for (let i = 1; i <= 7; i++)
        store.insert(task(i, 'success', i <= 2 ? '2026-01-01T00:00:00.000Z' : same));
      const seen: string[] = [];
      let cursor: string | undefined;
      do {
        const page = store.listPage({}, { limit: 3, cursor });
        seen.push(...page.items.map((t) => t.id.slice(-1)));
        cursor = page.next;
      } while (cursor);
      assert.deepEqual(seen, ['7', '6', '5', '4', '3', '2', '1']);
    });

    it('prunes finished tasks by age and beyond a count, never a running one', () => {
      const store = new TaskStore(db);
      store.insert(task(1, 'success', '2026-01-01T00:00:00.000Z'));
      store.insert(task(2, 'running', '2026-01-01T00:00:00.000Z'));
      for (let i = 3; i <= 6; i++) store.insert(task(i, 'failure', `2026-01-0${i}T00:00:00.000Z`));
      assert.equal(store.prune('2026-01-02T00:00:00.000Z', 2), 3);
      const left = store.list({}).map((t) => t.id.slice(-1));
      assert.deepEqual(left.sort(), ['2', '5', '6']);
    });

    it('a relaxed-durability write is read back, inside a transaction or not', () => {
      const store = new TaskStore(db);
      const t = task(1, 'running', '2026-01-01T00:00:00.000Z');
      store.insert(t);
      store.updateProgress({ ...t, bytes_done: 400, progress: 0.4 });
      assert.equal(store.get(t.id)?.bytes_done, 400);
      db.transaction(() => store.updateProgress({ ...t, bytes_done: 500, progress: 0.5 }))();
      assert.equal(store.get(t.id)?.progress, 0.5);
    });

    it('keeps members in the order they were added', () => {
      for (const id of ['c', 'a', 'b']) insertVdi(id, 512);
      db.prepare("INSERT INTO disk_sets (id, name_label, created_at) VALUES ('s', 'set', 'now')").run();
      for (const id of ['c', 'a', 'b'])
        db.prepare('INSERT INTO disk_set_members (set_id, vdi_id, added_at) VALUES (?, ?, ?)').run(
          's',
          id,
          'now',
        );
      const rows = db
        .prepare('SELECT m.vdi_id FROM disk_set_members m WHERE m.set_id = ? ORDER BY m.seq')
        .all('s');
      assert.deepEqual(
        rows.map((r) => (r as { vdi_id: string }).vdi_id),
        ['c', 'a', 'b'],
      );
    });
  });
}
