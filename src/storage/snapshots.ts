/**
 * Snapshots and clones: a new VDI whose file is a hard link of its source's
 * current generation file. A generation file never changes once committed
 * (a commit writes a new file and switches the row), so two names of one
 * inode hold the same disk for as long as both exist, and a later import into
 * either makes a new file without touching the other. Creating one costs a
 * link, a directory fsync and a row, whatever the disk's size.
 *
 * Crash safety comes from the order: link, fsync the directory, then insert
 * the row. A kill -9 before the insert leaves a link no row names, which the
 * startup collection removes (the source keeps its own name); after it, the
 * row names a link that is on disk. Deleting either VDI unlinks only its own
 * name: the file's blocks are freed with the last one.
 */
import { randomUUID } from 'node:crypto';
import { closeSync, promises as fsp, fsyncSync, linkSync, openSync, rmSync } from 'node:fs';
import path from 'node:path';
import { ApiError } from '../errors.js';
import { spaceError } from '../image/space.js';
import { nowIso } from './db.js';
import type { Page, PageRequest } from './paging.js';
import type { SrStore } from './srs.js';
import { fsyncDir, generationFileName, type Vdi, type VdiStore } from './vdis.js';

export interface SnapshotRequest {
  name_label?: string;
  name_description?: string;
}

export interface CloneRequest extends SnapshotRequest {
  sr?: string;
  image_format?: string;
}

/** A commit may unlink the generation being linked; the row read again names the new one. */
const LINK_ATTEMPTS = 5;

export class Snapshots {
  constructor(
    private readonly vdis: VdiStore,
    private readonly srs: SrStore,
  ) {}

  /** A read-only VDI holding the source's content as it is now. */
  snapshot(sourceId: string, req: SnapshotRequest): Promise<Vdi> {
    return this.share(sourceId, 'the snapshot', (source, now) => {
      if (source.is_snapshot) throw isSnapshot(source);
      return { is_snapshot: 1, snapshot_of: source.id, snapshot_time: now, ...names(source, req) };
    });
  }

  /**
   * A writable VDI starting with the source's content (a snapshot's
   * included), in the source's SR and format; a clone elsewhere is a copy
   * (ops/vdi-copy.ts).
   */
  clone(sourceId: string, req: CloneRequest): Promise<Vdi> {
    return this.share(sourceId, 'the clone', (source) => {
      const sr = this.srs.get(req.sr ?? source.sr_id);
      if (sr.id !== source.sr_id || (req.image_format ?? source.image_format) !== source.image_format) {
        throw new ApiError(
          'INVALID_REQUEST',
          `a shared clone is made in its source's SR ('${source.sr_id}') and format ('${source.image_format}')`,
          { sr: sr.id, source_sr: source.sr_id },
        );
      }
      return { is_snapshot: 0, snapshot_of: null, snapshot_time: null, ...names(source, req) };
    });
  }

  /**
   * Snapshots of every VDI of `sourceIds` as they all are at one instant,
   * recorded together with `record(snapshots)`. Every step runs without
   * yielding to the event loop (links, directory fsyncs, one transaction):
   * a commit switches its VDI's row in one synchronous transaction too, so
   * each commit is either in all of these snapshots' view of the world or in
   * none, and a commit that finished before this call is in it. The cost is a
   * link per member and an fsync per SR directory, during which nothing else
   * runs. A crash before the transaction leaves links no row names, collected
   * at startup.
   */
  snapshotAll<T>(sourceIds: readonly string[], req: SnapshotRequest, record: (snapshots: Vdi[]) => T): T {
    const linked: string[] = [];
    try {
      return this.vdis.inTransaction(() => {
        const now = nowIso();
        const dirs = new Set<string>();
        const made: Vdi[] = [];
        for (const sourceId of sourceIds) {
          const source = this.vdis.get(sourceId);
          if (source.is_snapshot) throw isSnapshot(source);
          const id = randomUUID();
          const fileName = generationFileName(id, 0, source.image_format);
          const dir = this.vdis.srOf(source).path;
          const target = path.join(dir, fileName);
          linkSync(this.vdis.imagePath(source), target);
          linked.push(target);
          dirs.add(dir);
          made.push({
            ...source,
            is_snapshot: 1,
            snapshot_of: source.id,
            snapshot_time: now,
            ...names(source, req),
            id,
            generation: 0,
            file_name: fileName,
            created_at: now,
          });
        }
        for (const dir of dirs) fsyncDirSync(dir);
        for (const vdi of made) this.vdis.insert(vdi);
        return record(made);
      });
    } catch (err) {
      for (const file of linked) rmSync(file, { force: true });
      throw spaceError(err, 'the set snapshot');
    }
  }

  /** The snapshots of a VDI (which must exist), newest first. */
  listOf(sourceId: string, page: PageRequest): Page<Vdi> {
    const source = this.vdis.get(sourceId);
    return this.vdis.listPage({ snapshot_of: source.id }, page);
  }

  private async share(
    sourceId: string,
    what: string,
    fieldsOf: (
      source: Vdi,
      now: string,
    ) => Pick<Vdi, 'is_snapshot' | 'snapshot_of' | 'snapshot_time' | 'name_label' | 'name_description'>,
  ): Promise<Vdi> {
    for (let attempt = 1; ; attempt++) {
      const source = this.vdis.get(sourceId);
      const now = nowIso();
      const id = randomUUID();
      const fileName = generationFileName(id, 0, source.image_format);
      const vdi: Vdi = {
        ...source,
        ...fieldsOf(source, now),
        id,
        generation: 0,
        file_name: fileName,
        created_at: now,
      };
      const dir = this.vdis.srOf(source).path;
      const target = path.join(dir, fileName);
      try {
        await fsp.link(this.vdis.imagePath(source), target);
      } catch (err) {
        // The source committed (or was deleted) meanwhile: read its row again.
        if ((err as NodeJS.ErrnoException).code === 'ENOENT' && attempt < LINK_ATTEMPTS) continue;
        throw spaceError(err, what);
      }
      let inserted: boolean;
      try {
        await fsyncDir(dir);
        inserted = this.vdis.insertIfSame(vdi, source);
      } catch (err) {
        await fsp.rm(target, { force: true });
        throw spaceError(err, what);
      }
      if (inserted) return vdi;
      // The source committed meanwhile: the link may be of a content it let go.
      await fsp.rm(target, { force: true });
      if (attempt >= LINK_ATTEMPTS) {
        throw new ApiError(
          'VDI_BUSY',
          `VDI ${sourceId} kept changing during ${what}; try again once its imports finish`,
          {
            vdi: sourceId,
          },
        );
      }
    }
  }
}

function isSnapshot(source: Vdi): ApiError {
  return new ApiError(
    'VDI_IS_SNAPSHOT',
    `VDI ${source.id} is a snapshot already: it cannot change, so a snapshot of it would hold nothing new; ` +
      `clone it (POST /v1/vdis/${source.id}/clone) for a writable copy`,
    { vdi: source.id, snapshot_of: source.snapshot_of },
  );
}

function fsyncDirSync(dir: string): void {
  const fd = openSync(dir, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

function names(source: Vdi, req: SnapshotRequest): Pick<Vdi, 'name_label' | 'name_description'> {
  return {
    name_label: req.name_label ?? source.name_label,
    name_description: req.name_description ?? source.name_description,
  };
}
