/**
 * What a transfer session's record says, read without the process that runs
 * it: its JSON for clients, its token, its expiry and the files it names.
 * Pure functions of the persisted record (and of the ranges received).
 */
import { createHash } from 'node:crypto';
import { safeEqual } from '../secrets.js';
import type { Task } from '../tasks/task-store.js';
import type { ByteRange, RangeSet } from './range-set.js';
import { streamingDestPath } from './streaming-import.js';
import type { Direction, Transfer } from './transfer-store.js';

export interface TransferJson {
  id: string;
  vdi: string;
  direction: Direction;
  format: string;
  size: number | null;
  checksum: string | null;
  state: string;
  task_id: string;
  created_at: string;
  expires_at: string;
  ttl_seconds: number;
  upload_offset: number;
  bytes_received: number;
  received: ByteRange[];
  /** Written with flush=n, not durable yet: not in `received` until a flush point. */
  unflushed_bytes: number;
  data_path: string;
  error: { code: string; message: string } | null;
  /** A delta upload's base (delta-import.ts), else null. */
  base: string | null;
  /** Whether the commit snapshots the VDI, and that snapshot once made (else null). */
  snapshot_after_commit: boolean;
  snapshot: string | null;
  url?: string;
  token?: string;
}

export function dataPath(id: string): string {
  return `/v1/transfers/${id}/data`;
}

/** Only the token's hash is stored: the database never holds a usable credential. */
export function hashToken(token: string): string {
  return createHash('sha256').update(token).digest('hex');
}

/** True when `token` is this transfer's own. */
export function tokenMatches(t: Transfer, token: string): boolean {
  return safeEqual(hashToken(token), t.token_hash);
}

export function isExpired(t: Transfer): boolean {
  return Date.parse(t.expires_at) <= Date.now();
}

/** Sliding expiry: activity keeps a session alive for another ttl. */
export function touch(t: Transfer): void {
  t.expires_at = new Date(Date.now() + t.ttl_seconds * 1000).toISOString();
}

/** Starts a new epoch: the next streaming import builds a disk of another name. */
export function nextEpoch(t: Transfer): void {
  t.stream_epoch += 1;
}

/** The raw disk a streaming import of this upload builds (its current epoch's). */
export function streamDestOf(t: Transfer): string {
  return streamingDestPath(t.staging_path!, t.stream_epoch);
}

/** The internal session of a one-shot PUT, which no client can resume. */
export function isOneShot(t: Transfer): boolean {
  return t.origin === 'one-shot';
}

/**
 * The session as clients see it. `error` is the task's: the holder of a
 * transfer token cannot read tasks, so the session says why it ended.
 */
export function toJson(
  t: Transfer,
  ranges: RangeSet,
  errorOf: () => Task['error'],
  secret?: { token: string; baseUrl: string },
  unflushedBytes = 0,
): TransferJson {
  return {
    id: t.id,
    vdi: t.vdi_id,
    direction: t.direction,
    format: t.format,
    size: t.size,
    checksum: t.checksum,
    state: t.state,
    task_id: t.task_id,
    created_at: t.created_at,
    expires_at: t.expires_at,
    ttl_seconds: t.ttl_seconds,
    upload_offset: ranges.contiguousFromZero(),
    bytes_received: ranges.size(),
    received: ranges.toJSON(),
    unflushed_bytes: unflushedBytes,
    data_path: dataPath(t.id),
    error: ['failed', 'cancelled', 'expired'].includes(t.state) ? errorOf() : null,
    base: t.base,
    snapshot_after_commit: t.snapshot_after_commit,
    snapshot: t.snapshot_id,
    ...(secret && {
      url: `${secret.baseUrl}${dataPath(t.id)}?token=${secret.token}`,
      token: secret.token,
    }),
  };
}
