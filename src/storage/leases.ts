/**
 * Leases in the metadata store: which node holds a resource (a VDI's
 * writer) across every node sharing the database. A lease lasts until it is
 * released or its `expires_at` passes; the holder's heartbeat pushes it on
 * (renew), so it lapses --node-timeout after its node stopped beating. A
 * lease of a node known dead (storage/nodes.ts: stopped, or its process gone
 * on this machine) may be taken at once.
 *
 * Fencing: each take moves the resource's `epoch` on. A holder checks its
 * epoch in the transaction that commits (assertHeld), as an UPDATE of the
 * lease's row, so a node whose lease lapsed and was taken over (or lapsed
 * alone: it is not renewed once past) cannot commit, and on PostgreSQL a
 * take-over waits for a commit that checked first.
 *
 * Times are ISO strings of each node's clock (see storage/nodes.ts); a
 * released lease's `expires_at` is '', before any time.
 */
import { ApiError } from '../errors.js';
import type { Db } from './db.js';

export interface LeaseHolder {
  node_id: string;
  holder: string;
  epoch: number;
  expires_at: string;
}

export type TakeResult = { ok: true; epoch: number } | { ok: false; current: LeaseHolder };

export class Leases {
  constructor(
    private readonly db: Db,
    private readonly nodeId: string,
    private readonly ttlMs: number,
    /** Whether a node is known dead (its leases may be taken before they lapse). */
    private readonly isDead: (nodeId: string) => boolean,
  ) {}

  /** Takes `resource` for `holder` unless a live lease holds it. */
  take(resource: string, holder: string): TakeResult {
    return this.db.transaction((): TakeResult => {
      const now = Date.now();
      const expires = new Date(now + this.ttlMs).toISOString();
      this.db
        .prepare(
          `INSERT INTO leases (resource, node_id, holder, epoch, expires_at)
           VALUES (@resource, @node, @holder, 1, @expires)
           ON CONFLICT (resource) DO UPDATE SET node_id = excluded.node_id, holder = excluded.holder,
             epoch = leases.epoch + 1, expires_at = excluded.expires_at
           WHERE leases.expires_at < @now`,
        )
        .run({ resource, node: this.nodeId, holder, expires, now: new Date(now).toISOString() });
      const current = this.current(resource) as LeaseHolder;
      if (current.node_id === this.nodeId && current.holder === holder && current.expires_at === expires) {
        return { ok: true, epoch: Number(current.epoch) };
      }
      if (current.node_id === this.nodeId || !this.isDead(current.node_id)) return { ok: false, current };
      // Its node is dead: taken now rather than when the lease lapses.
      const taken = this.db
        .prepare(
          `UPDATE leases SET node_id = @node, holder = @holder, epoch = epoch + 1, expires_at = @expires
           WHERE resource = @resource AND epoch = @epoch`,
        )
        .run({ resource, node: this.nodeId, holder, expires, epoch: current.epoch });
      return taken.changes === 1 ? { ok: true, epoch: Number(current.epoch) + 1 } : { ok: false, current };
    })();
  }

  /** The live lease on `resource`, if one is held. */
  holderOf(resource: string): LeaseHolder | undefined {
    const current = this.current(resource);
    if (!current || current.expires_at < new Date().toISOString()) return undefined;
    if (current.node_id !== this.nodeId && this.isDead(current.node_id)) return undefined;
    return current;
  }

  release(resource: string, epoch: number): void {
    this.db
      .prepare(
        `UPDATE leases SET holder = '', expires_at = '' WHERE resource = ? AND node_id = ? AND epoch = ?`,
      )
      .run(resource, this.nodeId, epoch);
  }

  /** Pushes this node's live leases on (each heartbeat); a lapsed one stays lapsed. */
  renew(now = Date.now()): void {
    this.db
      .prepare(`UPDATE leases SET expires_at = ? WHERE node_id = ? AND expires_at >= ?`)
      .run(new Date(now + this.ttlMs).toISOString(), this.nodeId, new Date(now).toISOString());
  }

  /** A graceful stop: other nodes need not wait for this node's leases to lapse. */
  releaseAll(): void {
    this.db.prepare(`UPDATE leases SET holder = '', expires_at = '' WHERE node_id = ?`).run(this.nodeId);
  }

  /**
   * Throws 409 VDI_LEASE_LOST unless this node still holds `resource` at
   * `epoch`, unexpired. Called inside the commit's transaction: on
   * PostgreSQL the UPDATE keeps the row locked until that commit.
   */
  assertHeld(resource: string, epoch: number, what: string): void {
    const held = this.db
      .prepare(
        `UPDATE leases SET expires_at = expires_at
         WHERE resource = ? AND node_id = ? AND epoch = ? AND expires_at >= ?`,
      )
      .run(resource, this.nodeId, epoch, new Date().toISOString());
    if (held.changes === 1) return;
    throw new ApiError(
      'VDI_LEASE_LOST',
      `this node's hold on ${what} lapsed (no heartbeat reached the metadata store within --node-timeout) and another node may have taken it: nothing was committed; run the operation again`,
      { resource },
    );
  }

  private current(resource: string): LeaseHolder | undefined {
    return this.db
      .prepare('SELECT node_id, holder, epoch, expires_at FROM leases WHERE resource = ?')
      .get(resource) as LeaseHolder | undefined;
  }
}
