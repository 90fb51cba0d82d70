/**
 * Merges of chains at rest (docs/design.md, "Merge (coalesce), crash-safe"),
 * as built for raw SRs. Two kinds, both planned from the contents table
 * alone, so a restart plans again whatever a kill -9 cut short:
 *
 * - **down**: a content P that no VDI names and that has one child layer C
 *   (its last snapshot was deleted) takes C's defined blocks into its own
 *   file; then every VDI naming C names P. Cost: C's data.
 *     1. Wait until every open reader holding P reads it under C (ChainGate).
 *     2. Copy C's defined ranges into P's file, fsync. Readers of C over P
 *        never read P where C is written; a kill -9 here leaves every row
 *        as it was and the copy is run again (same bytes, same places).
 *     3. Each VDI's file naming C becomes a link of P's file (link aside,
 *        rename over): P's file read as "C's ranges over P" is C over P,
 *        byte for byte, so readers opening it between 3 and 4 read right.
 *     4. One transaction: those VDIs name P, C's children hang under P, P
 *        defines what both defined, C's row goes.
 *     5. C's and P's spare names are unlinked (startup collects them after
 *        a crash). Readers holding C keep their open file.
 * - **flatten**: a VDI whose chain is deeper than the depth limit and whose
 *   layers are all held (by snapshots) has the layer at the limit filled
 *   from its parent's view, where it reads through today (those very bytes,
 *   so no reader sees a change), fsynced; then one transaction makes it
 *   flat. Cost: the data under it, once.
 *
 * Nothing here touches block digests: they describe each VDI's whole disk,
 * which a merge never changes, so changed blocks stay exact across merges.
 * One merge runs at a time (ops/merges.ts); memory is one 4 MiB buffer.
 */
import { randomUUID } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import type { BlockImage } from '../image/block-image.js';
import { ChainImage, type ChainLayer, type DefinedRange } from '../image/chain-image.js';
import { fillFromParent, type MergeWriteOptions, mergeDefinedInto, unionRanges } from '../image/raw-merge.js';
import { type ContentRow, decodeDefined, encodeDefined } from './contents.js';
import type { Db } from './db.js';
import { formatOfContent, openLayerFile } from './layer-files.js';
import { fillQcow2FromParent, mergeQcow2Down, reparentQcow2 } from './qcow2-layers.js';
import type { Sr, SrStore } from './srs.js';
import { fsyncDir, type Vdi, type VdiStore } from './vdis.js';
import { rewriteVhdLayer } from './vhd-layers.js';

export type MergePlan =
  | { kind: 'down'; child: string; parent: string; vdi: string | null; bytes: number }
  | { kind: 'flatten'; layer: string; parent: string; vdi: string | null; bytes: number };

/** What a merge did: `stale` when the chain changed under it (a delete, a commit) and it had nothing left to do. */
export type MergeOutcome = 'merged' | 'stale';

/**
 * What merging needs of one layer format at rest. Raw layers are built; a
 * qcow2 or vhd layer format adds its own (copy clusters and L2 entries,
 * blocks and BAT entries) behind the same two calls.
 */
interface LayerMergeBackend {
  /** Makes `defined` of the parent's file read as the child's file does there; grows it to `size`. */
  mergeDown(
    childFile: string,
    defined: readonly DefinedRange[],
    parentFile: string,
    sizes: { size: number; oldSize: number },
    opts: MergeWriteOptions,
  ): Promise<void>;
  /**
   * A format whose layers name their parent in the file (a qcow2 backing
   * file): makes the layer at `file` name `parentName` instead.
   */
  reparent?(file: string, parentName: string): Promise<void>;
  /** Makes the layer's file hold its whole view (`parent` read where it defines nothing), naming no parent. */
  fill(
    layerFile: string,
    defined: readonly DefinedRange[],
    parent: BlockImage,
    size: number,
    opts: MergeWriteOptions,
  ): Promise<void>;
}

/**
 * A layer format merged by rewriting instead (vhd: no in-place writer): the
 * merged layer X is written whole as a new file, X's view down to the
 * content it will stand on, keeping X's own identity (unique id, name), so
 * the layers over X still name it; each name of X then becomes a link of the
 * new file, and one transaction makes X stand lower. Cost: the data of every
 * layer merged into X (for a down merge, the parent's too), not only X's.
 */
type RewriteBackend = (
  view: BlockImage,
  defined: readonly DefinedRange[] | null,
  file: string,
  identityOf: string,
  parent: { name: string; file: string } | null,
  opts: MergeWriteOptions,
) => Promise<void>;

const REWRITERS: Record<string, RewriteBackend> = { vhd: rewriteVhdLayer };

const BACKENDS: Record<string, LayerMergeBackend> = {
  raw: { mergeDown: mergeDefinedInto, fill: fillFromParent },
  qcow2: { mergeDown: mergeQcow2Down, fill: fillQcow2FromParent, reparent: reparentQcow2 },
};

export interface MergeRunOptions {
  signal: AbortSignal;
  onBytes?: (n: number) => void;
  /**
   * Called inside the transaction that switches the rows, first: throws when
   * this node no longer holds the cluster's merge turn (another node may be
   * merging), so the switch is not made. Files written before it read as
   * they did: a merge stopped there is one killed there.
   */
  fence?: () => void;
}

export class ChainMerges {
  constructor(
    private readonly db: Db,
    private readonly srs: SrStore,
    private readonly vdis: VdiStore,
  ) {}

  /** Merges the chains need now, down merges first (cheap, and they make chains shallower). */
  plan(maxDepth: number): MergePlan[] {
    const contents = this.vdis.contents;
    const plans: MergePlan[] = [];
    const orphans = this.db
      .prepare(
        `SELECT c.id FROM contents c
         WHERE NOT EXISTS (SELECT 1 FROM vdis v WHERE v.content_id = c.id)
           AND (SELECT COUNT(*) FROM contents k WHERE k.parent = c.id) = 1
         ORDER BY c.created_at, c.id`,
      )
      .all() as { id: string }[];
    for (const { id } of orphans) {
      const child = this.db.prepare('SELECT * FROM contents WHERE parent = ?').get(id) as ContentRow;
      if (!mergeable(child.id) || !mergeable(id)) continue;
      plans.push({
        kind: 'down',
        child: child.id,
        parent: id,
        vdi: this.namerOf(child.id),
        bytes: total(decodeDefined(child)),
      });
    }
    const tops = this.db
      .prepare(
        `SELECT DISTINCT v.content_id AS id FROM vdis v JOIN contents c ON c.id = v.content_id
         WHERE c.parent IS NOT NULL ORDER BY v.content_id`,
      )
      .all() as { id: string }[];
    const seen = new Set<string>();
    for (const { id } of tops) {
      const chain = contents.chain(id);
      if (chain.length <= maxDepth) continue;
      const layer = chain[maxDepth - 1];
      if (seen.has(layer.id) || !mergeable(layer.id) || layer.parent === null) continue;
      seen.add(layer.id);
      plans.push({
        kind: 'flatten',
        layer: layer.id,
        parent: layer.parent,
        vdi: this.namerOf(id),
        bytes: layer.virtual_size - total(decodeDefined(layer)),
      });
    }
    return plans;
  }

  /** Runs one planned merge; `signal` stops it (between 4 MiB writes, never inside its switch). */
  run(plan: MergePlan, opts: MergeRunOptions): Promise<MergeOutcome> {
    const rewrite = REWRITERS[formatOfContent(plan.kind === 'down' ? plan.child : plan.layer)];
    if (rewrite) return this.rewrite(plan, rewrite, opts);
    return plan.kind === 'down' ? this.mergeDown(plan, opts) : this.flatten(plan, opts);
  }

  /**
   * A merge by rewriting (see RewriteBackend): the down merge of C into P
   * rewrites C over P's parent, the flatten of L rewrites L flat. Readers
   * never read the new file but as X's bytes where X defines, and as the
   * view under X elsewhere (the very bytes it holds), so no reader waits.
   * A kill -9 before the transaction leaves rows as they were, some names of
   * X on the new file: every read is right, and the rerun writes the same.
   */
  private async rewrite(
    plan: MergePlan,
    write: RewriteBackend,
    opts: MergeRunOptions,
  ): Promise<MergeOutcome> {
    const x = plan.kind === 'down' ? plan.child : plan.layer;
    const below = plan.parent;
    const stillDue = (): ContentRow | null => {
      const row = this.vdis.contents.get(x);
      if (!row || row.parent !== below) return null;
      if (plan.kind === 'down' && !this.downRows(x, below)) return null;
      return row;
    };
    return this.vdis.gate.runMerge(
      new Set([x, below]),
      () => true,
      opts.signal,
      async (signal) => {
        const row = stillDue();
        const under = this.vdis.contents.get(below);
        if (!row || !under) return 'stale';
        const sr = this.srs.get(row.sr_id);
        const dir = sr.path;
        const file = await this.fileOf(dir, x);
        if (!file) return 'stale';
        const newParent = plan.kind === 'down' ? under.parent : null;
        const defined = newParent === null ? null : unionRanges(decodeDefined(under), decodeDefined(row));
        const staged = this.vdis.stagingPathIn(sr, `merge-${randomUUID()}.${formatOfContent(x)}`);
        const view = await this.openChain(dir, below, row.virtual_size, { file, row });
        try {
          await write(
            view,
            defined,
            staged,
            file,
            newParent === null ? null : { name: newParent, file: path.join(dir, newParent) },
            { signal, onBytes: opts.onBytes },
          );
        } catch (err) {
          await fsp.rm(staged, { force: true });
          throw err;
        } finally {
          await view.close();
        }
        let released: string[] | null;
        let again: boolean;
        try {
          do {
            const namers = this.namersOf(x);
            const ids = namers.map((v) => v.id).join();
            const names = new Set(namers.map((v) => v.file_name));
            if (this.vdis.contents.isParent(x) || names.size === 0) names.add(x);
            for (const name of names) await this.relink(sr, staged, name);
            await fsyncDir(dir);
            again = false;
            released = this.db.transaction(() => {
              opts.fence?.();
              if (!stillDue()) return null;
              if (
                this.namersOf(x)
                  .map((v) => v.id)
                  .join() !== ids
              ) {
                again = true;
                return null;
              }
              this.db
                .prepare('UPDATE contents SET parent = ?, defined = ? WHERE id = ?')
                .run(newParent, defined === null ? null : encodeDefined(defined), x);
              return this.vdis.contents.release(below);
            })();
          } while (again);
        } finally {
          await fsp.rm(staged, { force: true });
        }
        if (released === null) return 'stale';
        for (const v of this.namersOf(x)) this.vdis.images.drop(v.id);
        for (const id of new Set([below, ...released])) await this.unlinkSpare(sr, id);
        return 'merged';
      },
    );
  }

  private async mergeDown(
    plan: Extract<MergePlan, { kind: 'down' }>,
    opts: MergeRunOptions,
  ): Promise<MergeOutcome> {
    const { child: c, parent: p } = plan;
    const allow = (chain: readonly string[]) => {
      const i = chain.indexOf(p);
      return i < 0 || (i > 0 && chain[i - 1] === c);
    };
    return this.vdis.gate.runMerge(new Set([c, p]), allow, opts.signal, async (signal) => {
      const rows = this.downRows(c, p);
      if (!rows) return 'stale';
      const { child, parent } = rows;
      const sr = this.srs.get(child.sr_id);
      const dir = sr.path;
      const parentFile = path.join(dir, p);
      const childFile = await this.fileOf(dir, c);
      if (!childFile) return 'stale';
      const defined = decodeDefined(child);
      const size = Math.max(child.virtual_size, parent.virtual_size);
      const backend = backendOf(c) as LayerMergeBackend;
      await backend.mergeDown(
        childFile,
        defined,
        parentFile,
        { size, oldSize: parent.virtual_size },
        { signal, onBytes: opts.onBytes },
      );
      // The switch is not cut short: each step below leaves every VDI reading right.
      // A snapshot or clone of C made meanwhile is one more name to relink: again.
      let namers: Vdi[];
      let done: 'merged' | 'stale' | 'again';
      do {
        namers = this.namersOf(c);
        const ids = namers.map((v) => v.id).join();
        // C's children will hang under P: a format naming parents in its files names P first
        // (P's file reads as C over P already, so either name reads right).
        const children = this.childrenOf(c);
        if (backend.reparent) {
          for (const k of children) {
            const file = await this.fileOf(dir, k);
            if (file) await backend.reparent(file, p);
          }
        }
        for (const v of namers) await this.relink(sr, parentFile, v.file_name);
        await fsyncDir(dir);
        done = this.db.transaction(() => {
          opts.fence?.();
          if (!this.downRows(c, p)) return 'stale' as const;
          if (
            this.namersOf(c)
              .map((v) => v.id)
              .join() !== ids ||
            this.childrenOf(c).join() !== children.join()
          )
            return 'again' as const;
          this.db.prepare('UPDATE vdis SET content_id = ? WHERE content_id = ?').run(p, c);
          this.db.prepare('UPDATE contents SET parent = ? WHERE parent = ?').run(p, c);
          const merged =
            parent.defined === null ? null : encodeDefined(unionRanges(decodeDefined(parent), defined));
          this.db
            .prepare('UPDATE contents SET defined = ?, virtual_size = ? WHERE id = ?')
            .run(merged, size, p);
          this.db.prepare('DELETE FROM contents WHERE id = ?').run(c);
          return 'merged' as const;
        })();
      } while (done === 'again');
      if (done === 'stale') return 'stale';
      for (const v of namers) this.vdis.images.drop(v.id);
      await this.unlinkSpare(sr, c);
      await this.unlinkSpare(sr, p);
      return 'merged';
    });
  }

  private async flatten(
    plan: Extract<MergePlan, { kind: 'flatten' }>,
    opts: MergeRunOptions,
  ): Promise<MergeOutcome> {
    const layer = this.vdis.contents.get(plan.layer);
    if (!layer || layer.parent !== plan.parent) return 'stale';
    const sr = this.srs.get(layer.sr_id);
    const dir = sr.path;
    const layerFile = await this.fileOf(dir, layer.id);
    if (!layerFile) return 'stale';
    const parentView = await this.openChain(dir, plan.parent, layer.virtual_size);
    try {
      await (backendOf(layer.id) as LayerMergeBackend).fill(
        layerFile,
        decodeDefined(layer),
        parentView,
        layer.virtual_size,
        {
          signal: opts.signal,
          onBytes: opts.onBytes,
        },
      );
    } finally {
      await parentView.close();
    }
    const released = this.db.transaction(() => {
      opts.fence?.();
      const now = this.vdis.contents.get(layer.id);
      if (!now || now.parent !== plan.parent) return null;
      this.db.prepare('UPDATE contents SET parent = NULL, defined = NULL WHERE id = ?').run(layer.id);
      return this.vdis.contents.release(plan.parent);
    })();
    if (released === null) return 'stale';
    // The parent's own name goes with its last child (its snapshots keep their files).
    for (const id of new Set([plan.parent, ...released])) await this.unlinkSpare(sr, id);
    return 'merged';
  }

  /** The rows of a down merge, if it still applies: C over P, P named by no VDI, C its only child. */
  private downRows(c: string, p: string): { child: ContentRow; parent: ContentRow } | null {
    const contents = this.vdis.contents;
    const child = contents.get(c);
    const parent = contents.get(p);
    if (!child || !parent || child.parent !== p) return null;
    if (contents.holders(p) !== 1) return null;
    return { child, parent };
  }

  /** The chain under and including `id`, read from id-named files (parents are kept under their ids). */
  private async openChain(
    dir: string,
    id: string,
    virtualSize: number,
    top?: { file: string; row: ContentRow },
  ): Promise<BlockImage> {
    const layers: ChainLayer[] = [];
    try {
      if (top) {
        const image = await openLayerFile(top.file, formatOfContent(top.row.id), top.row.virtual_size);
        layers.push({ image, defined: decodeDefined(top.row) });
      }
      for (const row of this.vdis.contents.chain(id)) {
        const image = await openLayerFile(path.join(dir, row.id), formatOfContent(row.id), row.virtual_size);
        layers.push({ image, defined: decodeDefined(row) });
      }
    } catch (err) {
      await Promise.all(layers.map((l) => l.image.close()));
      throw err;
    }
    return new ChainImage(virtualSize, layers);
  }

  /** A file holding content `id`: its id-named file, else a VDI's file naming it; null if none is left. */
  private async fileOf(dir: string, id: string): Promise<string | null> {
    const names = [id, ...this.namersOf(id).map((v) => v.file_name)];
    for (const name of names) {
      const file = path.join(dir, name);
      if (
        await fsp.access(file).then(
          () => true,
          () => false,
        )
      )
        return file;
    }
    return null;
  }

  private childrenOf(id: string): string[] {
    return (
      this.db.prepare('SELECT id FROM contents WHERE parent = ? ORDER BY id').all(id) as { id: string }[]
    ).map((r) => r.id);
  }

  private namersOf(id: string): Vdi[] {
    return this.db.prepare('SELECT * FROM vdis WHERE content_id = ? ORDER BY id').all(id) as Vdi[];
  }

  private namerOf(id: string): string | null {
    const row = this.db
      .prepare('SELECT id FROM vdis WHERE content_id = ? ORDER BY is_snapshot, created_at LIMIT 1')
      .get(id) as { id: string } | undefined;
    return row?.id ?? null;
  }

  /** Makes `name` in the SR another link of `file`, atomically (a link aside in staging, renamed over). */
  private async relink(sr: Sr, file: string, name: string): Promise<void> {
    const target = path.join(sr.path, name);
    if (target === file) return;
    const aside = this.vdis.stagingPathIn(sr, `merge-${randomUUID()}`);
    await fsp.link(file, aside);
    try {
      await fsp.rename(aside, target);
    } catch (err) {
      await fsp.rm(aside, { force: true });
      throw err;
    }
  }

  /** Unlinks content `id`'s own name unless a VDI's file or a layer still goes by it. */
  private async unlinkSpare(sr: Sr, id: string): Promise<void> {
    const named = this.db
      .prepare('SELECT 1 FROM vdis WHERE file_name = ? AND sr_id = ? LIMIT 1')
      .get(id, sr.id);
    if (named || this.vdis.contents.isParent(id)) return;
    await fsp.rm(path.join(sr.path, id), { force: true });
  }
}

function mergeable(contentId: string): boolean {
  const format = formatOfContent(contentId);
  return BACKENDS[format] !== undefined || REWRITERS[format] !== undefined;
}

function backendOf(contentId: string): LayerMergeBackend | undefined {
  return BACKENDS[formatOfContent(contentId)];
}

function total(ranges: readonly DefinedRange[]): number {
  return ranges.reduce((n, r) => n + r.length, 0);
}
