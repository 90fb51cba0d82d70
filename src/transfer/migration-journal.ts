/**
 * Where each outgoing set migration stands, in SQLite: what a source killed
 * mid-migration needs to resume it at startup without sending again what
 * the destination holds. One row per migration (its parent task's id): the
 * receive token (sealed with the service's token when it has one, as a
 * push's receiver URL is) and the progress as JSON, rewritten at every step
 * (a VDI made there, a ticket opened, a round's disk committed, a snapshot
 * taken). The bytes a ticket holds are not kept here: the destination says.
 */
import { type Db, nowIso } from '../storage/db.js';
import type { DiskMode } from './migration-plan.js';

export interface DiskProgress {
  vdi: string;
  mode: DiskMode;
  sr: string;
  format: string;
  /** Bytes of data at planning time: the child task's total. */
  data_bytes: number;
  task: string | null;
  /** The VDI made for it on the destination. */
  dest_vdi: string | null;
  /** The snapshot here whose content the destination VDI holds committed (null before the full copy). */
  holds: string | null;
  /** The bytes its full copy sent, once done (its progress after a restart). */
  full_bytes: number | null;
  /** The round being written: its snapshot here and the destination's write ticket. */
  sending: { snapshot: string; ticket: string; url: string } | null;
}

export interface MigrationProgress {
  set: string;
  delete_source: boolean;
  disks: DiskProgress[];
  /** Every snapshot taken here for it (removed when it ends). */
  taken: string[];
  /** 0: the full copy; then the rounds of changed blocks. */
  round: number;
  /** The current round's consistent snapshot, source VDI → snapshot; null until taken. */
  target: Record<string, string> | null;
  /** Bytes the current round sent for the disks it finished. */
  delta: number;
  /** The rounds are over: `target` is the final snapshot, which the destination holds. */
  synced: boolean;
  /** The destination committed the set. */
  committed: boolean;
}

export class MigrationJournal {
  constructor(private readonly db: Db) {}

  save(id: string, dest: string, p: MigrationProgress): void {
    this.db
      .prepare(
        `INSERT INTO migrations_out (id, dest, state, updated_at) VALUES (?, ?, ?, ?)
         ON CONFLICT(id) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at`,
      )
      .run(id, dest, JSON.stringify(p), nowIso());
  }

  list(): { id: string; dest: string; progress: MigrationProgress }[] {
    return (
      this.db.prepare('SELECT id, dest, state FROM migrations_out').all() as {
        id: string;
        dest: string;
        state: string;
      }[]
    ).map((r) => ({ id: r.id, dest: r.dest, progress: JSON.parse(r.state) }));
  }

  remove(id: string): void {
    this.db.prepare('DELETE FROM migrations_out WHERE id = ?').run(id);
  }

  /** The tasks a restart must leave running: each migration's parent and its disks'. */
  taskIds(): string[] {
    return this.list().flatMap((m) => [m.id, ...m.progress.disks.flatMap((d) => (d.task ? [d.task] : []))]);
  }
}
