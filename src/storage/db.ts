/**
 * The metadata store: SRs, VDIs, tasks, sessions and tickets, behind one
 * narrow synchronous interface (`Db`) with two backends: SQLite (embedded,
 * the default; storage/sqlite-db.ts) and PostgreSQL (`--database-url`;
 * storage/pg-db.ts). The stores write one SQL, a portable subset; what must
 * differ is translated in one place (storage/sql-dialect.ts).
 *
 * Why synchronous: the code relies on a metadata call finishing before the
 * event loop moves on: a transaction is atomic with respect to every other
 * request, and a commit is ordered with the file renames around it (crash
 * safety). Both backends keep that contract.
 */
import { openPgDb, type PgOptions } from './pg-db.js';
import { openSqliteDb } from './sqlite-db.js';

/** One prepared statement; parameters are `?` (positional) or `@name` (one object). */
export interface Statement {
  get(...params: unknown[]): unknown;
  all(...params: unknown[]): unknown[];
  run(...params: unknown[]): { changes: number };
}

export interface Db {
  readonly dialect: 'sqlite' | 'postgres';
  /** True inside `transaction`: a caller may skip what only a single statement needs. */
  readonly inTransaction: boolean;
  prepare(sql: string): Statement;
  /** `fn` as one transaction (nested: a savepoint); call what it returns, as better-sqlite3's. */
  transaction<A extends unknown[], T>(fn: (...args: A) => T): (...args: A) => T;
  /** Statements without parameters, several separated by `;` (migrations). */
  exec(sql: string): void;
  /**
   * Runs `fn`'s writes without waiting for them to reach stable storage:
   * for figures a power cut may lose (task progress). Commits stay ordered:
   * a later durable commit makes them durable too. Inside a transaction, it
   * is the transaction's durability that counts.
   */
  relaxedDurability<T>(fn: () => T): T;
  /**
   * A number that moves whenever this connection may have changed a row
   * (SQLite's total_changes()): where this connection is the database's
   * only writer (soleWriter), a cache of rows read since is still good
   * while it stays put.
   */
  changeCount(): number;
  /**
   * Whether no other process writes this database: SQLite's file is one
   * process's (the data directory's lock); PostgreSQL is shared by every
   * node of a cluster, whose writes this connection does not see coming.
   */
  readonly soleWriter: boolean;
  close(): void;
}

/** A migration in the portable subset, or one per dialect where they must differ. */
export type Migration = string | { readonly sqlite: string; readonly postgres: string };

/** Tables whose rows keep an order of insertion (paging, members): `seq`. */
const SEQUENCED = [
  'tasks',
  'vdis',
  'transfers',
  'disk_sets',
  'disk_set_snapshots',
  'disk_set_members',
  'migration_in_vdis',
];

/** Each entry moves the schema from version i to i+1; never edit one that has shipped. */
export const MIGRATIONS: readonly Migration[] = [
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
  {
    sqlite: `ALTER TABLE transfers ADD COLUMN origin TEXT NOT NULL DEFAULT 'api'
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
    // A PostgreSQL database began after this: it has no such metadata to move.
    postgres: `ALTER TABLE transfers ADD COLUMN origin TEXT NOT NULL DEFAULT 'api'
     CHECK (origin IN ('api', 'one-shot', 'tus'));
   ALTER TABLE transfers ADD COLUMN stream_epoch INTEGER NOT NULL DEFAULT 0;
   ALTER TABLE transfers ADD COLUMN push_target TEXT;
   ALTER TABLE transfers ADD COLUMN source_validator TEXT;`,
  },
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
  // Lists page and members keep their order by an explicit sequence, which
  // both dialects have (SQLite's rowid is not SQL): a trigger in SQLite, a
  // BIGSERIAL in PostgreSQL.
  {
    sqlite: SEQUENCED.map(
      (t) => `ALTER TABLE ${t} ADD COLUMN seq INTEGER;
         UPDATE ${t} SET seq = rowid;
         CREATE TRIGGER ${t}_seq AFTER INSERT ON ${t}
           BEGIN UPDATE ${t} SET seq = NEW.rowid WHERE rowid = NEW.rowid; END;`,
    ).join('\n'),
    postgres: SEQUENCED.map((t) => `ALTER TABLE ${t} ADD COLUMN seq BIGSERIAL;`).join('\n'),
  },
  // Several nodes over one database (storage/nodes.ts, storage/leases.ts): each process's row and
  // heartbeat, the node running each task, and leases that give one node a resource (a VDI's
  // writer) until they expire; epoch fences a node whose lease was taken over.
  `CREATE TABLE nodes (
     id TEXT PRIMARY KEY,
     address TEXT,
     hostname TEXT NOT NULL,
     pid INTEGER NOT NULL,
     started_at TEXT NOT NULL,
     heartbeat_at TEXT NOT NULL,
     stopped_at TEXT
   );
   ALTER TABLE tasks ADD COLUMN node_id TEXT;
   CREATE TABLE leases (
     resource TEXT PRIMARY KEY,
     node_id TEXT NOT NULL,
     holder TEXT NOT NULL,
     epoch INTEGER NOT NULL,
     expires_at TEXT NOT NULL
   );`,
  // An upload that writes part of its VDI in place (an imageio write ticket): what it did not
  // write keeps the VDI's content, and its finalize lays what it wrote over that content.
  `ALTER TABLE transfers ADD COLUMN in_place INTEGER NOT NULL DEFAULT 0;`,
];

/** A migration's text for SQLite. */
export function sqliteMigration(m: Migration): string {
  return typeof m === 'string' ? m : m.sqlite;
}

export interface OpenOptions {
  /** SQLite's file, used when there is no `databaseUrl`. */
  file: string;
  /** `postgres://…`: the metadata lives there instead. */
  databaseUrl?: string;
  pg?: PgOptions;
}

/** Opens the store and brings its schema to the latest migration. */
export function openDb(opts: OpenOptions | string): Db {
  const o = typeof opts === 'string' ? { file: opts } : opts;
  return o.databaseUrl ? openPgDb(o.databaseUrl, MIGRATIONS, o.pg) : openSqliteDb(o.file, MIGRATIONS);
}

const statements = new WeakMap<Db, Map<string, Statement>>();

/**
 * A prepared statement, prepared once per database: for the lookups every
 * request makes (a VDI, its SR), where preparing costs more than running.
 */
export function cachedStatement(db: Db, sql: string): Statement {
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
