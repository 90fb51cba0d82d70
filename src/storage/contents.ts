/**
 * Chains at rest (docs/design.md, "Chains at rest"), as built for raw SRs.
 *
 * A **content** is what one commit (or a create) wrote: its id is the file
 * name it was first written under (`<vdi>.g<N>.<format>`), and it never
 * changes. A VDI row names its content (`content_id`) and its own file name,
 * a hard link of the content's file (a snapshot or clone is another link of
 * the same inode, so it names the same content). The content id is stable for
 * every committed generation and snapshot: what changed-block tracking keys
 * on.
 *
 * A content without a row in `contents` is flat: its file is the whole disk.
 * A content with a row is either a **layer** (`parent` set, `defined` the
 * ranges its file defines; the rest reads through the parent) or a flat
 * content kept as a **parent** of layers (`parent` and `defined` null). A
 * parent is always on disk under its id, so its children can open it
 * whichever VDI names are gone.
 *
 * A content is **held** by the VDIs naming it and by the layers over it;
 * one held by nothing is released (row and id-named file), and so on down.
 */

import type { DefinedRange } from '../image/chain-image.js';
import type { Db } from './db.js';

export interface ContentRow {
  id: string;
  sr_id: string;
  parent: string | null;
  /** JSON of [start, length] pairs; null for a flat content. */
  defined: string | null;
  virtual_size: number;
  created_at: string;
}

export class Contents {
  constructor(private readonly db: Db) {}

  get(id: string): ContentRow | undefined {
    return this.db.prepare('SELECT * FROM contents WHERE id = ?').get(id) as ContentRow | undefined;
  }

  /** The chain under (and including) `id`, top first; the last has no parent. */
  chain(id: string): ContentRow[] {
    const out: ContentRow[] = [];
    for (let row = this.get(id); row; row = row.parent ? this.get(row.parent) : undefined) out.push(row);
    return out;
  }

  /** How many VDIs and layers hold `id`, not counting VDI `exceptVdi`. */
  holders(id: string, exceptVdi?: string): number {
    const vdis = this.db
      .prepare('SELECT COUNT(*) AS n FROM vdis WHERE content_id = ? AND id IS NOT ?')
      .get(id, exceptVdi ?? null) as { n: number };
    const layers = this.db.prepare('SELECT COUNT(*) AS n FROM contents WHERE parent = ?').get(id) as {
      n: number;
    };
    return vdis.n + layers.n;
  }

  /** True when a layer is built over `id`: its id-named file must stay. */
  isParent(id: string): boolean {
    return this.db.prepare('SELECT 1 FROM contents WHERE parent = ? LIMIT 1').get(id) !== undefined;
  }

  insert(row: ContentRow): void {
    this.db
      .prepare(
        `INSERT INTO contents (id, sr_id, parent, defined, virtual_size, created_at)
         VALUES (@id, @sr_id, @parent, @defined, @virtual_size, @created_at)`,
      )
      .run(row);
  }

  /** Records a flat content as a parent (a no-op when it has a row already). */
  keepAsParent(id: string, srId: string, virtualSize: number, now: string): void {
    this.db
      .prepare(
        `INSERT OR IGNORE INTO contents (id, sr_id, parent, defined, virtual_size, created_at)
         VALUES (?, ?, NULL, NULL, ?, ?)`,
      )
      .run(id, srId, virtualSize, now);
  }

  /**
   * Inside a transaction: releases `id` if nothing holds it, then its parent
   * if that is now held by nothing, and so on. Returns the ids released:
   * their id-named files are the caller's to unlink, after the commit.
   */
  release(id: string | null): string[] {
    const released: string[] = [];
    for (let at = id; at !== null && this.holders(at) === 0; ) {
      const row = this.get(at);
      released.push(at);
      if (!row) break;
      this.db.prepare('DELETE FROM contents WHERE id = ?').run(at);
      at = row.parent;
    }
    return released;
  }

  /** Startup: rows held by nothing (a crash between a commit and its release), released. */
  releaseUnheld(): string[] {
    const out: string[] = [];
    for (;;) {
      const rows = this.db.prepare('SELECT id FROM contents').all() as { id: string }[];
      const unheld = rows.filter((r) => this.holders(r.id) === 0);
      if (unheld.length === 0) return out;
      this.db.transaction(() => {
        for (const r of unheld) out.push(...this.release(r.id));
      })();
    }
  }

  /** Ids of every content kept as a parent in `srId`: their id-named files are live. */
  parentIds(srId: string): string[] {
    return (
      this.db
        .prepare('SELECT DISTINCT parent FROM contents WHERE sr_id = ? AND parent IS NOT NULL')
        .all(srId) as { parent: string }[]
    ).map((r) => r.parent);
  }
}

export function encodeDefined(ranges: readonly DefinedRange[]): string {
  return JSON.stringify(ranges.map((r) => [r.start, r.length]));
}

/** A row's ranges: all of a flat content's disk. */
export function decodeDefined(row: ContentRow): DefinedRange[] {
  if (row.defined === null) return [{ start: 0, length: row.virtual_size }];
  return (JSON.parse(row.defined) as [number, number][]).map(([start, length]) => ({ start, length }));
}
