/**
 * What incremental pushes remember, per (source VDI, target): the last pair
 * of snapshots both ends hold (the source's snapshot that was sent, and the
 * snapshot the receiver made of what it committed), and the push under way,
 * so that a restart resumes it and a failed one leaves nothing behind. One
 * row per pair in the metadata store (db.ts, table push_pairs).
 */
import { type Db, nowIso } from '../storage/db.js';

/** A push under way: enough to resume it after a restart and to finish its bookkeeping. */
export interface PendingPush {
  /** The local download session that sends. */
  transfer: string;
  /** The source's snapshot being sent. */
  snapshot: string;
  /** A delta push: the source snapshot the receiver's `target_base` holds; null for a full one. */
  base: string | null;
  target_base: string | null;
  /** Why a push asked to be incremental is full (null when it is a delta, or the first one). */
  fallback: string | null;
  /** The previous pair, retired (both snapshots deleted) once this push has committed. */
  retire: { source: string | null; target: string | null };
  /** The target's management token, sealed as a push's receiver URL is (secrets.ts); null without one. */
  token: string | null;
}

export interface PushPair {
  source_vdi: string;
  /** `{server} {vdi}` (targetKey). */
  target: string;
  source_snapshot: string | null;
  target_snapshot: string | null;
  pending: PendingPush | null;
}

type Row = Omit<PushPair, 'pending'> & { pending: string | null };

/** The key of a target: its server's URL (no query, no trailing slash) and its VDI. */
export function targetKey(server: URL, vdi: string): string {
  return `${server.origin}${server.pathname.replace(/\/+$/, '')} ${vdi}`;
}

export class PushPairs {
  constructor(private readonly db: Db) {}

  get(sourceVdi: string, target: string): PushPair | null {
    const row = this.db
      .prepare('SELECT * FROM push_pairs WHERE source_vdi = ? AND target = ?')
      .get(sourceVdi, target) as Row | undefined;
    return row ? { ...row, pending: row.pending ? JSON.parse(row.pending) : null } : null;
  }

  /** Every pair with a push under way. */
  pending(): PushPair[] {
    return (this.db.prepare('SELECT * FROM push_pairs WHERE pending IS NOT NULL').all() as Row[]).map(
      (row) => ({ ...row, pending: JSON.parse(row.pending!) }),
    );
  }

  /** Starts a push: the pair as it was stays the base until `commit`. */
  begin(sourceVdi: string, target: string, pending: PendingPush): void {
    this.db
      .prepare(
        `INSERT INTO push_pairs (source_vdi, target, pending, updated_at) VALUES (?, ?, ?, ?)
         ON CONFLICT (source_vdi, target) DO UPDATE SET pending = excluded.pending, updated_at = excluded.updated_at`,
      )
      .run(sourceVdi, target, JSON.stringify(pending), nowIso());
  }

  /** A push committed: the new pair (null when the receiver made no snapshot), nothing pending. */
  commit(sourceVdi: string, target: string, pair: { source: string; target: string } | null): void {
    this.db
      .prepare(
        `UPDATE push_pairs SET source_snapshot = ?, target_snapshot = ?, pending = NULL, updated_at = ?
         WHERE source_vdi = ? AND target = ?`,
      )
      .run(pair?.source ?? null, pair?.target ?? null, nowIso(), sourceVdi, target);
  }

  /** A push ended without committing: the pair stays as it was. */
  abandon(sourceVdi: string, target: string): void {
    this.db
      .prepare('UPDATE push_pairs SET pending = NULL, updated_at = ? WHERE source_vdi = ? AND target = ?')
      .run(nowIso(), sourceVdi, target);
  }
}
