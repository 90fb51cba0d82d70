/**
 * Keyset paging for the lists (tasks, VDIs, transfers): newest first, by
 * (created_at, seq). A cursor names the last row of a page, so a walk
 * returns every row that existed when it began exactly once, however many
 * rows are created or removed while it runs (an offset would skip or repeat
 * them). Cursors are opaque to clients: base64url of the key.
 */
import { ApiError } from '../errors.js';
import type { Db } from './db.js';

export const DEFAULT_PAGE_LIMIT = 100;
export const MAX_PAGE_LIMIT = 1000;

export interface PageRequest {
  limit: number;
  cursor?: string;
}

export interface Page<T> {
  items: T[];
  /** The cursor of the next page; absent on the last one. */
  next?: string;
}

interface Key {
  createdAt: string;
  rowid: number;
}

function encodeCursor(key: Key): string {
  return Buffer.from(JSON.stringify([key.createdAt, key.rowid])).toString('base64url');
}

function decodeCursor(cursor: string): Key {
  try {
    const [createdAt, rowid] = JSON.parse(Buffer.from(cursor, 'base64url').toString('utf8'));
    if (typeof createdAt === 'string' && Number.isSafeInteger(rowid)) return { createdAt, rowid };
  } catch {
    // falls through to the error below
  }
  throw new ApiError(
    'INVALID_CURSOR',
    `cursor '${cursor.slice(0, 64)}' is not one this service gave; start again without it and follow the next link`,
  );
}

/**
 * One page of `SELECT * FROM table WHERE where...`, newest first. `where`
 * holds SQL conditions over named `params`; the rows come back as stored.
 */
export function selectPage<Row>(
  db: Db,
  table: string,
  where: string[],
  params: Record<string, unknown>,
  page: PageRequest,
): Page<Row> {
  const conditions = [...where];
  const bound: Record<string, unknown> = { ...params, page_limit: page.limit + 1 };
  if (page.cursor) {
    const key = decodeCursor(page.cursor);
    conditions.push(
      '(created_at < @cursor_created OR (created_at = @cursor_created AND seq < @cursor_rowid))',
    );
    bound.cursor_created = key.createdAt;
    bound.cursor_rowid = key.rowid;
  }
  const sql = `SELECT seq AS page_rowid, * FROM ${table}
               ${conditions.length ? `WHERE ${conditions.join(' AND ')}` : ''}
               ORDER BY created_at DESC, seq DESC LIMIT @page_limit`;
  const rows = db.prepare(sql).all(bound) as (Row & { page_rowid: number; created_at: string })[];
  const more = rows.length > page.limit;
  const kept = more ? rows.slice(0, page.limit) : rows;
  const last = kept[kept.length - 1];
  const items = kept.map(({ page_rowid: _, ...row }) => row as unknown as Row);
  return more
    ? { items, next: encodeCursor({ createdAt: last.created_at, rowid: last.page_rowid }) }
    : { items };
}
