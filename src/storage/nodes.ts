/**
 * The nodes sharing one metadata store: one row per diskport process, with a
 * heartbeat. A node whose heartbeat is older than the node timeout is dead:
 * another node takes over its tasks, and its leases lapse (storage/leases.ts).
 *
 * Why the process's host and pid too: a node restarted on the same machine
 * (the common case: kill -9, then start again) knows at once that its
 * predecessor is dead, instead of waiting out the timeout before resuming
 * the transfers it left. On SQLite every other node is dead: the data
 * directory's lock (storage/data-dir-lock.ts) makes this process the only one.
 *
 * Clocks: heartbeats and expiries are written with each node's clock, so the
 * nodes' clocks must agree to well within the node timeout (NTP does).
 */
import { randomUUID } from 'node:crypto';
import os from 'node:os';
import type { Db } from './db.js';

/** Rows of nodes gone this long are removed when a node starts. */
const FORGET_AFTER_MS = 24 * 3600 * 1000;

export interface NodeRow {
  id: string;
  address: string | null;
  hostname: string;
  pid: number;
  started_at: string;
  heartbeat_at: string;
  stopped_at: string | null;
}

export interface NodeInfo extends NodeRow {
  alive: boolean;
}

export interface NodeOptions {
  heartbeatMs: number;
  timeoutMs: number;
  /** No other process can share the store (SQLite): every other node is dead. */
  exclusive: boolean;
  /** Called after each heartbeat that reached the store (leases are renewed there). */
  onBeat?: (now: number) => void;
  /** Called by a graceful stop before the node is marked stopped (its leases are released there). */
  onStop?: () => void;
  /** A heartbeat that could not be written (the store unreachable): the node's leases will lapse. */
  onError?: (err: unknown) => void;
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export class Nodes {
  readonly id = randomUUID();
  private readonly hostname = os.hostname();
  private timer: NodeJS.Timeout | null = null;

  constructor(
    private readonly db: Db,
    readonly opts: NodeOptions,
  ) {}

  /** Records this node (and forgets nodes long gone). */
  register(address: string | null = null): void {
    const now = Date.now();
    this.db.transaction(() => {
      this.db
        .prepare('DELETE FROM nodes WHERE heartbeat_at < ?')
        .run(new Date(now - FORGET_AFTER_MS).toISOString());
      this.db
        .prepare(
          `INSERT INTO nodes (id, address, hostname, pid, started_at, heartbeat_at)
           VALUES (?, ?, ?, ?, ?, ?)`,
        )
        .run(
          this.id,
          address,
          this.hostname,
          process.pid,
          new Date(now).toISOString(),
          new Date(now).toISOString(),
        );
    })();
  }

  /** The URL this node serves at, once it listens. */
  setAddress(address: string): void {
    this.db.prepare('UPDATE nodes SET address = ? WHERE id = ?').run(address, this.id);
  }

  start(): void {
    // Alone on the store (SQLite), nobody reads the heartbeat: it would only write.
    if (this.opts.exclusive) return;
    this.timer = setInterval(() => this.beat(), this.opts.heartbeatMs);
    this.timer.unref();
  }

  beat(): void {
    const now = Date.now();
    try {
      this.db
        .prepare('UPDATE nodes SET heartbeat_at = ? WHERE id = ?')
        .run(new Date(now).toISOString(), this.id);
      this.opts.onBeat?.(now);
    } catch (err) {
      this.opts.onError?.(err);
    }
  }

  /** Every node the store knows, newest first, with whether it is alive. */
  list(): NodeInfo[] {
    const rows = this.db.prepare('SELECT * FROM nodes ORDER BY started_at DESC, id').all() as NodeRow[];
    const now = Date.now();
    return rows.map((r) => ({
      ...r,
      // A node that does not beat (alone on SQLite) is alive as it answers.
      heartbeat_at: r.id === this.id && this.opts.exclusive ? new Date(now).toISOString() : r.heartbeat_at,
      alive: this.isAlive(r, now),
    }));
  }

  /** The ids of the other nodes that are dead (their tasks and leases may be taken over). */
  deadIds(): Set<string> {
    return new Set(
      this.list()
        .filter((n) => !n.alive)
        .map((n) => n.id),
    );
  }

  /**
   * The node that holds an active session (runs its task), by the session's
   * id or by the id of the imageio ticket it carries; null when none does.
   */
  holderOf(key: { transfer: string } | { ticket: string }): NodeInfo | null {
    const row = (
      'transfer' in key
        ? this.db
            .prepare(
              `SELECT n.* FROM transfers t JOIN tasks k ON k.id = t.task_id JOIN nodes n ON n.id = k.node_id
                WHERE t.id = ? AND t.state IN ('open', 'finalizing')`,
            )
            .get(key.transfer)
        : this.db
            .prepare(
              `SELECT n.* FROM imageio_tickets i JOIN transfers t ON t.id = i.transfer_id
                 JOIN tasks k ON k.id = t.task_id JOIN nodes n ON n.id = k.node_id
                WHERE i.id = ? AND t.state IN ('open', 'finalizing')`,
            )
            .get(key.ticket)
    ) as NodeRow | undefined;
    return row ? { ...row, alive: this.isAlive(row, Date.now()) } : null;
  }

  /** Whether node `id` is dead (or unknown: forgotten long ago). */
  isDead(id: string): boolean {
    if (id === this.id) return false;
    const row = this.db.prepare('SELECT * FROM nodes WHERE id = ?').get(id) as NodeRow | undefined;
    return !row || !this.isAlive(row, Date.now());
  }

  /** Whether any other node is alive: what only a lone node may do (collect unreferenced files) waits. */
  othersAlive(): boolean {
    return this.list().some((n) => n.alive && n.id !== this.id);
  }

  private isAlive(n: NodeRow, now: number): boolean {
    if (n.id === this.id) return true;
    if (this.opts.exclusive || n.stopped_at) return false;
    if (Date.parse(n.heartbeat_at) < now - this.opts.timeoutMs) return false;
    // Same machine: the process says it better than the clock.
    return n.hostname !== this.hostname || pidAlive(n.pid);
  }

  /** A graceful stop: other nodes need not wait out the timeout. */
  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    try {
      this.opts.onStop?.();
      this.db.prepare('UPDATE nodes SET stopped_at = ? WHERE id = ?').run(new Date().toISOString(), this.id);
    } catch {
      // the store is away: the timeout says it instead
    }
  }
}
