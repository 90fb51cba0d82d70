/**
 * The embedded metadata store: SRs, VDIs and tasks in SQLite (WAL).
 *
 * synchronous=FULL: a committed transaction survives a kill -9 and a power
 * cut; the write rate here (a few rows per transfer) makes the extra fsync
 * cheap. A running task's progress (once a second) is the exception: it is
 * written without one (TaskStore.updateProgress).
 */
import { chmodSync, closeSync, openSync } from 'node:fs';
import Database from 'better-sqlite3';
import { PRIVATE_FILE_MODE } from '../image/file-io.js';

export type Db = Database.Database;

/** Each entry moves the schema from version i to i+1; never edit one that has shipped. */
export const MIGRATIONS: readonly string[] = [
  `CREATE TABLE srs (
     id TEXT PRIMARY KEY,
     name_label TEXT NOT NULL,
     path TEXT NOT NULL,
     supported_image_formats TEXT NOT NULL,
     default_image_format TEXT NOT NULL,
     created_at TEXT NOT NULL
   );
   CREATE TABLE vdis (
     id TEXT PRIMARY KEY,
     sr_id TEXT NOT NULL REFERENCES srs(id),
     name_label TEXT NOT NULL,
     name_description TEXT NOT NULL DEFAULT '',
     virtual_size INTEGER NOT NULL,
     image_format TEXT NOT NULL,
     generation INTEGER NOT NULL DEFAULT 0,
     file_name TEXT NOT NULL,
     created_at TEXT NOT NULL,
     content_updated_at TEXT NOT NULL
   );
   CREATE TABLE tasks (
     id TEXT PRIMARY KEY,
     type TEXT NOT NULL,
     status TEXT NOT NULL,
     progress REAL NOT NULL DEFAULT 0,
     bytes_done INTEGER NOT NULL DEFAULT 0,
     bytes_total INTEGER,
     vdi_id TEXT,
     created_at TEXT NOT NULL,
     started_at TEXT,
     finished_at TEXT,
     error TEXT,
     result TEXT,
     staging_path TEXT
   );
   CREATE INDEX tasks_by_vdi ON tasks(vdi_id, created_at);
   CREATE INDEX tasks_by_status ON tasks(status, created_at);`,
  `CREATE TABLE transfers (
     id TEXT PRIMARY KEY,
     vdi_id TEXT NOT NULL,
     direction TEXT NOT NULL,
     format TEXT NOT NULL,
     size INTEGER,
     checksum TEXT,
     token_hash TEXT NOT NULL,
     task_id TEXT NOT NULL,
     staging_path TEXT,
     state TEXT NOT NULL,
     ttl_seconds INTEGER NOT NULL,
     expires_at TEXT NOT NULL,
     created_at TEXT NOT NULL,
     received TEXT NOT NULL DEFAULT '[]',
     source_url TEXT,
     target_url TEXT,
     metadata TEXT
   );
   CREATE INDEX transfers_by_vdi ON transfers(vdi_id, state);
   CREATE INDEX transfers_by_state ON transfers(state, expires_at);`,
  // Lists page newest first by (created_at, rowid).
  `CREATE INDEX tasks_by_created ON tasks(created_at);
   CREATE INDEX vdis_by_created ON vdis(created_at);
   CREATE INDEX transfers_by_created ON transfers(created_at);`,
  // Snapshots: read-only VDIs sharing their source's generation file (storage/snapshots.ts).
  `ALTER TABLE vdis ADD COLUMN is_snapshot INTEGER NOT NULL DEFAULT 0;
   ALTER TABLE vdis ADD COLUMN snapshot_of TEXT;
   ALTER TABLE vdis ADD COLUMN snapshot_time TEXT;
   CREATE INDEX vdis_by_snapshot_of ON vdis(snapshot_of, created_at);`,
  // A session's own fields leave the client's metadata, where they were "diskport.*" keys.
  `ALTER TABLE transfers ADD COLUMN origin TEXT NOT NULL DEFAULT 'api'
     CHECK (origin IN ('api', 'one-shot', 'tus'));
   ALTER TABLE transfers ADD COLUMN stream_epoch INTEGER NOT NULL DEFAULT 0;
   ALTER TABLE transfers ADD COLUMN push_target TEXT;
   ALTER TABLE transfers ADD COLUMN source_validator TEXT;
   UPDATE transfers SET
     origin = CASE
       WHEN json_extract(metadata, '$."diskport.one-shot"') = 'true' THEN 'one-shot'
       WHEN json_extract(metadata, '$."diskport.tus"') = 'true' THEN 'tus'
       ELSE 'api' END,
     stream_epoch = CAST(COALESCE(json_extract(metadata, '$."diskport.stream-epoch"'), '0') AS INTEGER),
     push_target = json_extract(metadata, '$."diskport.push-target"'),
     source_validator = json_extract(metadata, '$."diskport.source-validator"'),
     metadata = NULLIF(
       json_remove(metadata, '$."diskport.one-shot"', '$."diskport.tus"', '$."diskport.stream-epoch"',
         '$."diskport.push-target"', '$."diskport.source-validator"'),
       '{}')
   WHERE json_valid(metadata);`,
  // Block digests per generation (storage/block-digests.ts); NULL: written before they existed.
  `ALTER TABLE vdis ADD COLUMN digest_file TEXT;`,
  // ovirt-imageio tickets: each names the transfer session that carries its bytes.
  `CREATE TABLE imageio_tickets (
     id TEXT PRIMARY KEY,
     transfer_id TEXT NOT NULL REFERENCES transfers(id),
     vdi_id TEXT NOT NULL,
     since TEXT,
     url TEXT NOT NULL,
     ops TEXT NOT NULL,
     size INTEGER NOT NULL,
     timeout INTEGER NOT NULL,
     inactivity_timeout INTEGER NOT NULL,
     sparse INTEGER NOT NULL,
     dirty INTEGER NOT NULL,
     client_transfer_id TEXT,
     state TEXT NOT NULL CHECK (state IN ('installed', 'finalized', 'canceled', 'expired', 'deleted')),
     expires_at TEXT NOT NULL,
     created_at TEXT NOT NULL
   );
   CREATE INDEX imageio_tickets_by_transfer ON imageio_tickets(transfer_id);`,
  // Chains at rest (storage/contents.ts): a VDI names the content it reads
  // (its file's first name); a content with a row is a layer over a parent,
  // or a parent kept under its own name.
  `ALTER TABLE vdis ADD COLUMN content_id TEXT;
   UPDATE vdis SET content_id = file_name;
   CREATE TABLE contents (
     id TEXT PRIMARY KEY,
     sr_id TEXT NOT NULL REFERENCES srs(id),
     parent TEXT REFERENCES contents(id),
     defined TEXT,
     virtual_size INTEGER NOT NULL,
     created_at TEXT NOT NULL
   );
   CREATE INDEX vdis_by_content ON vdis(content_id);
   CREATE INDEX contents_by_parent ON contents(parent);`,
  // Disk sets (storage/disk-sets.ts): a VDI may be in several; a deleted VDI leaves them.
  `CREATE TABLE disk_sets (
     id TEXT PRIMARY KEY,
     name_label TEXT NOT NULL,
     name_description TEXT NOT NULL DEFAULT '',
     created_at TEXT NOT NULL
   );
   CREATE INDEX disk_sets_by_created ON disk_sets(created_at);
   CREATE TABLE disk_set_members (
     set_id TEXT NOT NULL REFERENCES disk_sets(id) ON DELETE CASCADE,
     vdi_id TEXT NOT NULL REFERENCES vdis(id) ON DELETE CASCADE,
     added_at TEXT NOT NULL,
     PRIMARY KEY (set_id, vdi_id)
   );
   CREATE INDEX disk_set_members_by_vdi ON disk_set_members(vdi_id);
   CREATE TABLE disk_set_snapshots (
     id TEXT PRIMARY KEY,
     set_id TEXT NOT NULL REFERENCES disk_sets(id) ON DELETE CASCADE,
     name_label TEXT NOT NULL,
     snapshot_time TEXT NOT NULL,
     members TEXT NOT NULL,
     created_at TEXT NOT NULL
   );
   CREATE INDEX disk_set_snapshots_by_set ON disk_set_snapshots(set_id, created_at);`,
  // Delta uploads: the snapshot (or 'current') a session's differencing image applies over.
  `ALTER TABLE transfers ADD COLUMN base TEXT;`,
  // Incoming migrations (transfer/migration-receive.ts): a receive token's scope, and the VDIs made under it.
  `CREATE TABLE migrations_in (
     id TEXT PRIMARY KEY,
     secret_hash TEXT NOT NULL,
     sr_id TEXT,
     state TEXT NOT NULL CHECK (state IN ('open', 'committed', 'aborted')),
     expires_at TEXT NOT NULL,
     created_at TEXT NOT NULL
   );
   CREATE TABLE migration_in_vdis (
     migration_id TEXT NOT NULL REFERENCES migrations_in(id),
     vdi_id TEXT NOT NULL,
     PRIMARY KEY (migration_id, vdi_id)
   );`,
  // Incremental push (transfer/push-incremental.ts): an upload that snapshots its VDI once committed,
  // and per (source VDI, target) the last snapshot pair both ends hold, and the push under way.
  `ALTER TABLE transfers ADD COLUMN snapshot_after_commit INTEGER NOT NULL DEFAULT 0;
   ALTER TABLE transfers ADD COLUMN snapshot_id TEXT;
   CREATE TABLE push_pairs (
     source_vdi TEXT NOT NULL,
     target TEXT NOT NULL,
     source_snapshot TEXT,
     target_snapshot TEXT,
     pending TEXT,
     updated_at TEXT NOT NULL,
     PRIMARY KEY (source_vdi, target)
   );`,
  // Outgoing set migrations (transfer/migration-journal.ts): where each stands, so a restart resumes it.
  `CREATE TABLE migrations_out (
     id TEXT PRIMARY KEY,
     dest TEXT NOT NULL,
     state TEXT NOT NULL,
     updated_at TEXT NOT NULL
   );`,
];

export function openDb(file: string): Db {
  // SQLite creates its file world-readable, and its -wal and -shm files with
  // the database's mode: create it private first (and make an older one so).
  closeSync(openSync(file, 'a', PRIVATE_FILE_MODE));
  chmodSync(file, PRIVATE_FILE_MODE);
  for (const companion of [`${file}-wal`, `${file}-shm`]) {
    try {
      chmodSync(companion, PRIVATE_FILE_MODE);
    } catch {
      // not there: SQLite creates it with the database's mode
    }
  }
  const db = new Database(file);
  db.pragma('journal_mode = WAL');
  db.pragma('synchronous = FULL');
  db.pragma('foreign_keys = ON');
  db.pragma('busy_timeout = 5000');
  migrate(db);
  return db;
}

function migrate(db: Db): void {
  const current = db.pragma('user_version', { simple: true }) as number;
  for (let v = current; v < MIGRATIONS.length; v++) {
    db.transaction(() => {
      db.exec(MIGRATIONS[v]);
      db.pragma(`user_version = ${v + 1}`);
    })();
  }
}

const statements = new WeakMap<Db, Map<string, Database.Statement>>();

/**
 * A prepared statement, prepared once per database: for the lookups every
 * request makes (a VDI, its SR), where preparing costs more than running.
 */
export function cachedStatement(db: Db, sql: string): Database.Statement {
  let byText = statements.get(db);
  if (!byText) {
    byText = new Map();
    statements.set(db, byText);
  }
  let stmt = byText.get(sql);
  if (!stmt) {
    stmt = db.prepare(sql);
    byText.set(sql, stmt);
  }
  return stmt;
}

export function nowIso(): string {
  return new Date().toISOString();
}
