/** Transfer sessions in the metadata store: they outlive the process, as resumable uploads must. */
import type { Db } from '../storage/db.js';
import { type Page, type PageRequest, selectPage } from '../storage/paging.js';
import type { ByteRange } from './range-set.js';

export type Direction = 'upload' | 'download';
export type TransferState = 'open' | 'finalizing' | 'committed' | 'cancelled' | 'expired' | 'failed';
export const ACTIVE_STATES: readonly TransferState[] = ['open', 'finalizing'];
/** What opened a session: POST /v1/transfers (pulls and pushes too), a one-shot PUT, or tus. */
export type TransferOrigin = 'api' | 'one-shot' | 'tus';

export interface Transfer {
  id: string;
  vdi_id: string;
  direction: Direction;
  format: string;
  /** Declared total bytes of the upload stream; null until known. */
  size: number | null;
  /** `algorithm:hex` of the whole stream, verified at finalize. */
  checksum: string | null;
  token_hash: string;
  task_id: string;
  staging_path: string | null;
  state: TransferState;
  ttl_seconds: number;
  expires_at: string;
  created_at: string;
  received: ByteRange[];
  source_url: string | null;
  target_url: string | null;
  /** The client's own metadata (tus `Upload-Metadata`), as it sent it: nothing of diskport's. */
  metadata: Record<string, string> | null;
  origin: TransferOrigin;
  /** Bumped by each reset: names the disk a streaming import builds (see streamingDestPath). */
  stream_epoch: number;
  /** A push's receiver `url`, token included, sealed when the service has a token (secrets.ts): never in JSON. */
  push_target: string | null;
  /** A pull's source ETag or Last-Modified, for If-Range when it resumes after a restart. */
  source_validator: string | null;
  /** A delta upload's base: a snapshot's id, or `current` (delta-import.ts); null for a whole image. */
  base: string | null;
  /** An upload that snapshots its VDI once committed (an incremental push's receiver, push-incremental.ts). */
  snapshot_after_commit: boolean;
  /** That snapshot, once made. */
  snapshot_id: string | null;
  /**
   * An upload that writes part of the disk in place (an imageio write
   * ticket): the ranges it did not write keep the VDI's content, and it is
   * committed as what it wrote laid over that content.
   */
  in_place: boolean;
}

type Row = Omit<Transfer, 'received' | 'metadata' | 'snapshot_after_commit' | 'in_place'> & {
  received: string;
  metadata: string | null;
  snapshot_after_commit: number;
  in_place: number;
};

function fromRow(r: Row): Transfer {
  return {
    ...r,
    received: JSON.parse(r.received),
    metadata: r.metadata ? JSON.parse(r.metadata) : null,
    snapshot_after_commit: r.snapshot_after_commit === 1,
    in_place: r.in_place === 1,
  };
}

export class TransferStore {
  constructor(private readonly db: Db) {}

  insert(t: Transfer): void {
    this.db
      .prepare(
        `INSERT INTO transfers (id, vdi_id, direction, format, size, checksum, token_hash, task_id, staging_path, state,
           ttl_seconds, expires_at, created_at, received, source_url, target_url, metadata, origin, stream_epoch,
           push_target, source_validator, base, snapshot_after_commit, snapshot_id, in_place)
         VALUES (@id, @vdi_id, @direction, @format, @size, @checksum, @token_hash, @task_id, @staging_path, @state,
           @ttl_seconds, @expires_at, @created_at, @received, @source_url, @target_url, @metadata, @origin,
           @stream_epoch, @push_target, @source_validator, @base, @snapshot_after_commit, @snapshot_id, @in_place)`,
      )
      .run({
        ...t,
        received: JSON.stringify(t.received),
        metadata: t.metadata ? JSON.stringify(t.metadata) : null,
        snapshot_after_commit: t.snapshot_after_commit ? 1 : 0,
        in_place: t.in_place ? 1 : 0,
      });
  }

  /** Records the snapshot a committed upload made of its VDI. */
  setSnapshot(id: string, snapshotId: string): void {
    this.db.prepare('UPDATE transfers SET snapshot_id = ? WHERE id = ?').run(snapshotId, id);
  }

  get(id: string): Transfer | undefined {
    const row = this.db.prepare('SELECT * FROM transfers WHERE id = ?').get(id) as Row | undefined;
    return row && fromRow(row);
  }

  list(filter: { vdi?: string; active?: boolean } = {}): Transfer[] {
    const where: string[] = [];
    if (filter.vdi) where.push('vdi_id = @vdi');
    if (filter.active) where.push(`state IN ('open','finalizing')`);
    const sql = `SELECT * FROM transfers ${where.length ? `WHERE ${where.join(' AND ')}` : ''} ORDER BY created_at DESC`;
    return (this.db.prepare(sql).all({ vdi: filter.vdi }) as Row[]).map(fromRow);
  }

  /** One page of sessions, newest first. */
  listPage(filter: { vdi?: string; active?: boolean }, page: PageRequest): Page<Transfer> {
    const where: string[] = [];
    if (filter.vdi) where.push('vdi_id = @vdi');
    if (filter.active) where.push(`state IN ('open','finalizing')`);
    const rows = selectPage<Row>(this.db, 'transfers', where, { vdi: filter.vdi }, page);
    return { ...rows, items: rows.items.map(fromRow) };
  }

  /** Persists the mutable fields of a session. */
  save(t: Transfer): void {
    this.db
      .prepare(
        `UPDATE transfers SET size=@size, state=@state, expires_at=@expires_at, received=@received,
           stream_epoch=@stream_epoch, source_validator=@source_validator WHERE id=@id`,
      )
      .run({
        id: t.id,
        size: t.size,
        state: t.state,
        expires_at: t.expires_at,
        received: JSON.stringify(t.received),
        stream_epoch: t.stream_epoch,
        source_validator: t.source_validator,
      });
  }
}
