/**
 * Disk sets (libvirt's "selected disk set"): a named, persisted set of VDIs
 * that snapshots and migrations take together. A VDI may be in several sets;
 * deleting a VDI removes it from every set (the members' foreign key
 * cascades), deleting a set leaves its VDIs alone.
 *
 * A set snapshot is one snapshot per member taken at one instant
 * (Snapshots.snapshotAll), recorded with the list of what it holds.
 */
import { randomUUID } from 'node:crypto';
import { ApiError, NotFoundError } from '../errors.js';
import { type Db, nowIso } from './db.js';
import { type Page, type PageRequest, selectPage } from './paging.js';
import type { SnapshotRequest, Snapshots } from './snapshots.js';
import type { Vdi, VdiStore } from './vdis.js';

export interface DiskSet {
  id: string;
  name_label: string;
  name_description: string;
  created_at: string;
}

export interface DiskSetJson extends DiskSet {
  /** Member VDI ids, in the order they were added. */
  vdis: string[];
  /** How many members. */
  size: number;
  /** The members' virtual sizes added up, in bytes. */
  virtual_size: number;
}

export interface CreateDiskSet {
  name_label: string;
  name_description?: string;
  vdis?: string[];
}

export interface SetSnapshotMember {
  /** The member VDI. */
  vdi: string;
  /** Its snapshot, taken with the others. */
  snapshot: string;
}

export interface SetSnapshot {
  id: string;
  disk_set: string;
  name_label: string;
  snapshot_time: string;
  snapshots: SetSnapshotMember[];
  created_at: string;
}

interface SetSnapshotRow {
  id: string;
  set_id: string;
  name_label: string;
  snapshot_time: string;
  members: string;
  created_at: string;
}

export class DiskSets {
  constructor(
    private readonly db: Db,
    private readonly vdis: VdiStore,
    private readonly snapshots: Snapshots,
  ) {}

  create(req: CreateDiskSet): DiskSet {
    const set: DiskSet = {
      id: randomUUID(),
      name_label: req.name_label,
      name_description: req.name_description ?? '',
      created_at: nowIso(),
    };
    this.db.transaction(() => {
      this.db
        .prepare(
          'INSERT INTO disk_sets (id, name_label, name_description, created_at) VALUES (@id, @name_label, @name_description, @created_at)',
        )
        .run(set);
      this.addAllIn(set.id, req.vdis ?? []);
    })();
    return set;
  }

  get(id: string): DiskSet {
    const row = this.db.prepare('SELECT * FROM disk_sets WHERE id = ?').get(id) as DiskSet | undefined;
    if (!row) throw new NotFoundError('disk set', id);
    return row;
  }

  listPage(page: PageRequest): Page<DiskSet> {
    return selectPage<DiskSet>(this.db, 'disk_sets', [], {}, page);
  }

  update(id: string, patch: { name_label?: string; name_description?: string }): DiskSet {
    const set = this.get(id);
    const next = { ...set, ...patch };
    this.db
      .prepare('UPDATE disk_sets SET name_label=@name_label, name_description=@name_description WHERE id=@id')
      .run(next);
    return this.get(id);
  }

  /** Deletes the set and its snapshot records; its VDIs and their snapshots stay. */
  delete(id: string): void {
    this.get(id);
    this.db.prepare('DELETE FROM disk_sets WHERE id = ?').run(id);
  }

  /** The member VDIs, in the order they were added. */
  members(id: string): Vdi[] {
    this.get(id);
    return this.db
      .prepare(
        `SELECT v.* FROM disk_set_members m JOIN vdis v ON v.id = m.vdi_id
         WHERE m.set_id = ? ORDER BY m.seq`,
      )
      .all(id) as Vdi[];
  }

  /** Adds a VDI; false when it was a member already. */
  add(id: string, vdiId: string): boolean {
    return this.db.transaction(() => {
      this.get(id);
      return this.addAllIn(id, [vdiId]) === 1;
    })();
  }

  /** Adds every VDI listed (all must exist, or none is added); returns how many were not members. */
  addAll(id: string, vdiIds: readonly string[]): number {
    return this.db.transaction(() => {
      this.get(id);
      return this.addAllIn(id, vdiIds);
    })();
  }

  remove(id: string, vdiId: string): void {
    this.get(id);
    const { changes } = this.db
      .prepare('DELETE FROM disk_set_members WHERE set_id = ? AND vdi_id = ?')
      .run(id, vdiId);
    if (changes === 0) {
      throw new ApiError(
        'DISK_SET_MEMBER_NOT_FOUND',
        `VDI '${vdiId}' is not a member of disk set ${id}; GET /v1/disk-sets/${id} lists its members`,
        { disk_set: id, vdi: vdiId },
      );
    }
  }

  /** Empties the set; returns how many members it had. */
  removeAll(id: string): number {
    this.get(id);
    return this.db.prepare('DELETE FROM disk_set_members WHERE set_id = ?').run(id).changes;
  }

  toJson(set: DiskSet): DiskSetJson {
    const rows = this.db
      .prepare(
        `SELECT v.id, v.virtual_size FROM disk_set_members m JOIN vdis v ON v.id = m.vdi_id
         WHERE m.set_id = ? ORDER BY m.seq`,
      )
      .all(set.id) as { id: string; virtual_size: number }[];
    return {
      ...set,
      vdis: rows.map((r) => r.id),
      size: rows.length,
      virtual_size: rows.reduce((sum, r) => sum + r.virtual_size, 0),
    };
  }

  /**
   * Snapshots every member at one instant (see Snapshots.snapshotAll): no
   * commit is in some members' snapshots and not in others'.
   */
  snapshot(id: string, req: SnapshotRequest): SetSnapshot {
    const set = this.get(id);
    const memberIds = this.members(id).map((v) => v.id);
    return this.snapshots.snapshotAll(memberIds, req, (made) => {
      const snap: SetSnapshot = {
        id: randomUUID(),
        disk_set: set.id,
        name_label: req.name_label ?? set.name_label,
        snapshot_time: made[0]?.snapshot_time ?? nowIso(),
        snapshots: made.map((v) => ({ vdi: v.snapshot_of as string, snapshot: v.id })),
        created_at: nowIso(),
      };
      this.db
        .prepare(
          `INSERT INTO disk_set_snapshots (id, set_id, name_label, snapshot_time, members, created_at)
           VALUES (@id, @disk_set, @name_label, @snapshot_time, @members, @created_at)`,
        )
        .run({ ...snap, members: JSON.stringify(snap.snapshots) });
      return snap;
    });
  }

  listSnapshots(id: string, page: PageRequest): Page<SetSnapshot> {
    this.get(id);
    const rows = selectPage<SetSnapshotRow>(
      this.db,
      'disk_set_snapshots',
      ['set_id = @set'],
      { set: id },
      page,
    );
    return { ...rows, items: rows.items.map(fromSnapshotRow) };
  }

  getSnapshot(id: string, snapshotId: string): SetSnapshot {
    this.get(id);
    const row = this.db
      .prepare('SELECT * FROM disk_set_snapshots WHERE id = ? AND set_id = ?')
      .get(snapshotId, id) as SetSnapshotRow | undefined;
    if (!row) throw new NotFoundError('disk set snapshot', snapshotId);
    return fromSnapshotRow(row);
  }

  /** Deletes a set snapshot's record, and with `vdis` its member snapshots. */
  async deleteSnapshot(id: string, snapshotId: string): Promise<void> {
    const snap = this.getSnapshot(id, snapshotId);
    this.db.prepare('DELETE FROM disk_set_snapshots WHERE id = ?').run(snap.id);
    for (const m of snap.snapshots) {
      await this.vdis.delete(m.snapshot).catch((err) => {
        if ((err as ApiError).code !== 'VDI_NOT_FOUND') throw err;
      });
    }
  }

  private addAllIn(id: string, vdiIds: readonly string[]): number {
    const insert = this.db.prepare(
      'INSERT OR IGNORE INTO disk_set_members (set_id, vdi_id, added_at) VALUES (?, ?, ?)',
    );
    const now = nowIso();
    let added = 0;
    for (const vdiId of vdiIds) {
      this.vdis.get(vdiId);
      added += insert.run(id, vdiId, now).changes;
    }
    return added;
  }
}

function fromSnapshotRow(r: SetSnapshotRow): SetSnapshot {
  return {
    id: r.id,
    disk_set: r.set_id,
    name_label: r.name_label,
    snapshot_time: r.snapshot_time,
    snapshots: JSON.parse(r.members) as SetSnapshotMember[],
    created_at: r.created_at,
  };
}
