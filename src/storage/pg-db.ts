/**
 * The PostgreSQL backend (`--database-url`), synchronous like SQLite's.
 *
 * Why a worker thread that the caller blocks on: every store relies on a
 * metadata call finishing before the event loop moves on (a transaction is
 * atomic with respect to every other request; a commit is ordered with the
 * file renames around it). `pg` is asynchronous, and turning every caller
 * async would touch every store and route at once. So `pg` runs on one
 * dedicated connection in a worker thread; a call posts its statement there
 * and waits on a SharedArrayBuffer (`Atomics.wait`) until the answer is
 * posted back, then takes it with `receiveMessageOnPort`. That is the same
 * blocking better-sqlite3 does for a file, with a round trip to the server
 * instead of a page read. A transaction is BEGIN…COMMIT on that one
 * connection (a nested one a savepoint), so nothing else can run in between.
 *
 * The cost: the event loop waits out each round trip (a fraction of a
 * millisecond on a local server), as it waits out an fsync with SQLite.
 * The alternative of an async store interface stays open: callers would
 * await the same `Statement` methods, and this worker would serve them.
 *
 * Failures: a server that cannot be reached when diskport starts stops it
 * with a message (DatabaseUnreachableError); one lost afterwards fails the
 * calls of the moment with 503 METADATA_UNAVAILABLE and Retry-After, and the
 * worker connects again at the next call.
 */

import { createRequire } from 'node:module';
import { MessageChannel, type MessagePort, receiveMessageOnPort, Worker } from 'node:worker_threads';
import { ApiError } from '../errors.js';
import type { Db, Migration, Statement } from './db.js';
import { PG_WORKER_SOURCE } from './pg-worker.js';
import { bindValues, ddlToPostgres, type PgStatement, toPostgres } from './sql-dialect.js';

const require = createRequire(import.meta.url);

export interface PgOptions {
  /** How long connecting may take before the server counts as unreachable. */
  connectTimeoutMs?: number;
  /** How long one statement may take before the server counts as lost. */
  queryTimeoutMs?: number;
}

/** Seconds a client is told to wait when the database is away. */
export const METADATA_RETRY_AFTER_SECONDS = 5;

/** The advisory lock the migrations run under (any fixed key no other application of the database uses). */
const MIGRATION_LOCK_KEY = 0x64_69_73_6b; // 'disk'

export type PgRequest =
  | { op: 'query'; text: string; values: unknown[] }
  | { op: 'exec'; text: string }
  | { op: 'close' };

/** What the worker posts back, with the `id` of the request it answers. */
export type PgReply =
  | { ok: true; rows: Record<string, unknown>[]; changes: number }
  | { ok: false; message: string; code?: string; unavailable: boolean };

/** The database named by --database-url could not be reached at start-up. */
export class DatabaseUnreachableError extends Error {}

/** The URL without its password, for messages and logs. */
export function redactUrl(url: string): string {
  try {
    const u = new URL(url);
    if (u.password) u.password = '***';
    return u.toString();
  } catch {
    return 'the --database-url given (not a valid URL)';
  }
}

class PgStatementHandle implements Statement {
  private readonly pg: PgStatement;

  constructor(
    private readonly db: PgDb,
    private readonly sql: string,
  ) {
    this.pg = toPostgres(sql);
  }

  get(...params: unknown[]): unknown {
    return this.query(params).rows[0];
  }

  all(...params: unknown[]): unknown[] {
    return this.query(params).rows;
  }

  run(...params: unknown[]): { changes: number } {
    return { changes: this.query(params).changes };
  }

  private query(params: unknown[]) {
    return this.db.call({ op: 'query', text: this.pg.text, values: bindValues(this.pg, params, this.sql) });
  }
}

class PgDb implements Db {
  readonly dialect = 'postgres';
  private readonly signal = new Int32Array(new SharedArrayBuffer(4));
  private readonly port: MessagePort;
  private readonly worker: Worker;
  private depth = 0;
  private closed = false;
  private writes = 0;
  readonly soleWriter = false;
  /** The id of the last request posted: the answer to wait for carries it. */
  private sent = 0;

  constructor(
    private readonly url: string,
    private readonly opts: Required<PgOptions>,
  ) {
    const { port1, port2 } = new MessageChannel();
    this.port = port1;
    this.worker = new Worker(PG_WORKER_SOURCE, {
      eval: true,
      execArgv: [],
      workerData: { pgPath: require.resolve('pg'), url, port: port2, signal: this.signal, ...opts },
      transferList: [port2],
    });
    this.worker.unref();
    this.worker.on('error', () => {
      // reported to the next call, which finds no answer
    });
  }

  get inTransaction(): boolean {
    return this.depth > 0;
  }

  /** Posts one request to the worker and blocks until its answer. */
  call(req: PgRequest): { rows: Record<string, unknown>[]; changes: number } {
    if (this.closed) throw new Error('the metadata store is closed');
    // Counted before the answer: a write that failed half-way may have changed rows all the same.
    if (req.op !== 'query' || !/^\s*SELECT\b/i.test(req.text)) this.writes++;
    const id = ++this.sent;
    this.port.postMessage({ ...req, id });
    // The worker's own timeouts answer first; this bound only catches a worker that died or hangs.
    const deadline = Date.now() + this.opts.connectTimeoutMs + this.opts.queryTimeoutMs + 5000;
    let reply: PgReply | undefined;
    for (;;) {
      // Cleared before looking, so an answer posted after the look still wakes the wait below.
      Atomics.store(this.signal, 0, 0);
      const message = receiveMessageOnPort(this.port)?.message as (PgReply & { id: number }) | undefined;
      // An answer to an earlier call that gave up waiting: taken as this one's, every later call
      // would read the answer of the call before it (a SELECT of SRs answered with tasks' rows).
      if (message && message.id !== id) continue;
      if (message) {
        reply = message;
        break;
      }
      const left = deadline - Date.now();
      if (left <= 0) break;
      Atomics.wait(this.signal, 0, 0, left);
    }
    if (!reply) throw this.unavailable('no answer from the database worker');
    if (reply.ok) return reply;
    if (reply.unavailable) throw this.unavailable(reply.message);
    throw Object.assign(new Error(`${reply.message} (PostgreSQL ${reply.code ?? ''})`), { code: reply.code });
  }

  private unavailable(reason: string): ApiError {
    return new ApiError(
      'METADATA_UNAVAILABLE',
      `the metadata database cannot be reached (${reason}); retry in ${METADATA_RETRY_AFTER_SECONDS} seconds`,
      undefined,
      { 'Retry-After': String(METADATA_RETRY_AFTER_SECONDS) },
    );
  }

  prepare(sql: string): Statement {
    return new PgStatementHandle(this, sql);
  }

  transaction<A extends unknown[], T>(fn: (...args: A) => T): (...args: A) => T {
    return (...args: A): T => {
      const savepoint = this.depth > 0 ? `sp${this.depth}` : null;
      this.call({ op: 'exec', text: savepoint ? `SAVEPOINT ${savepoint}` : 'BEGIN' });
      this.depth++;
      let result: T;
      try {
        result = fn(...args);
        if (result instanceof Promise) throw new TypeError('Transaction function cannot return a promise');
      } catch (err) {
        this.depth--;
        try {
          this.call({
            op: 'exec',
            text: savepoint
              ? `ROLLBACK TO SAVEPOINT ${savepoint}; RELEASE SAVEPOINT ${savepoint}`
              : 'ROLLBACK',
          });
        } catch {
          // the connection is gone, and the transaction with it
        }
        throw err;
      }
      this.depth--;
      this.call({ op: 'exec', text: savepoint ? `RELEASE SAVEPOINT ${savepoint}` : 'COMMIT' });
      return result;
    };
  }

  exec(sql: string): void {
    this.call({ op: 'exec', text: sql });
  }

  relaxedDurability<T>(fn: () => T): T {
    if (this.depth > 0) return fn();
    // The commit is still ordered in the WAL before every later one: a crash loses it, never reorders it.
    this.exec('SET synchronous_commit = off');
    try {
      return fn();
    } finally {
      this.exec('SET synchronous_commit = on');
    }
  }

  changeCount(): number {
    return this.writes;
  }

  close(): void {
    if (this.closed) return;
    try {
      this.call({ op: 'close' });
    } catch {
      // closing anyway
    }
    this.closed = true;
    this.port.close();
    void this.worker.terminate();
  }

  /** Connects (a start-up failure says so plainly) and runs the migrations not yet applied. */
  migrate(migrations: readonly Migration[]): void {
    try {
      this.transaction(() => {
        // One diskport migrates at a time; the others wait here and find it
        // done. The lock comes before the first CREATE: nodes started
        // together on a new database would otherwise collide in
        // PostgreSQL's catalog on CREATE TABLE IF NOT EXISTS itself.
        this.prepare('SELECT pg_advisory_xact_lock(?)').get(MIGRATION_LOCK_KEY);
        this.exec('CREATE TABLE IF NOT EXISTS diskport_schema (version INTEGER NOT NULL)');
        const row = this.prepare('SELECT version FROM diskport_schema').get() as
          | { version: number }
          | undefined;
        if (!row) this.exec('INSERT INTO diskport_schema (version) VALUES (0)');
        for (let v = row?.version ?? 0; v < migrations.length; v++) {
          const m = migrations[v];
          this.exec(typeof m === 'string' ? ddlToPostgres(m) : m.postgres);
          this.prepare('UPDATE diskport_schema SET version = ?').run(v + 1);
        }
      })();
    } catch (err) {
      this.close();
      const reason = err instanceof Error ? err.message : String(err);
      throw new DatabaseUnreachableError(
        `cannot use the PostgreSQL database ${redactUrl(this.url)}: ${reason}; check --database-url (DISKPORT_DATABASE_URL), that the server runs and that the user may create tables there`,
      );
    }
  }
}

export function openPgDb(url: string, migrations: readonly Migration[], opts: PgOptions = {}): Db {
  const db = new PgDb(url, { connectTimeoutMs: 10_000, queryTimeoutMs: 30_000, ...opts });
  db.migrate(migrations);
  return db;
}
