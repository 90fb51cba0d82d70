/**
 * Commits of new content into a VDI (docs/design.md, "Chains at rest"): the
 * new generation's file (flat, or a layer over the nearest shared content),
 * its block digests, and the one transaction that switches the VDI's row.
 *
 * Two ways in. commitContent takes a whole disk staged in the VDI's format
 * and writes the layer of what differs from the parent (told by the two
 * disks' block digests where the parent has them, else by reading both). A
 * delta import goes through commitDelta instead: the layer holds only the
 * delta's blocks that differ from what the VDI reads (told by the block
 * digests, not by reading the VDI), and the digests change for those blocks
 * only, so the commit costs O(the delta), not O(the disk).
 *
 * Either way the new files are written and fsynced under names no row
 * holds before the switch: a kill -9 before it leaves the VDI as it was (the
 * orphans collected at startup), after it as committed.
 */
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import type { DiffRun } from '../image/block-diff.js';
import { diffBlocks } from '../image/block-diff.js';
import type { BlockImage } from '../image/block-image.js';
import { ChainImage, type DefinedRange } from '../image/chain-image.js';
import { CountingImage } from '../image/counting-image.js';
import { RawFileImage } from '../image/raw-file-image.js';
import { spaceError } from '../image/space.js';
import { zeroRange } from '../image/sparse.js';
import { isZero } from '../image/zero.js';
import {
  blockEntriesInto,
  DIGEST_BLOCK_BYTES,
  DIGEST_ENTRY_BYTES,
  DigestUpdate,
  digestDiffRuns,
  writeBlockDigests,
} from './block-digests.js';
import { decodeDefined, encodeDefined } from './contents.js';
import { nowIso } from './db.js';
import { LAYERED_FORMATS, writeLayerFile } from './layer-files.js';
import type { StreamedDigests } from './streamed-digests.js';
import { digestFileName, fsyncDir, generationFileName, type Vdi, type VdiStore } from './vdis.js';

export interface CommitOptions {
  virtualSize?: number;
  /** More writes that must commit together with the switch (e.g. the transfer's state). */
  inTransaction?: (generation: number) => void;
  /** Digests of blocks of `stagedFile` hashed as they were written (not read again). */
  digests?: StreamedDigests | null;
}

/** A layer about to be committed: the content it reads through, and the ranges it defines (JSON). */
interface NewLayer {
  parent: string;
  defined: string;
}

/** Blocks read, hashed and written per step of a delta commit: 4 MiB. */
const DELTA_CHUNK_BLOCKS = 64;

/**
 * A raw file that already holds a delta's blocks at their disk offsets (a
 * qcow2 delta streamed into it as it arrived: streaming-import.ts), durable,
 * with the digests of the blocks hashed on the way (the rest are read).
 */
export interface AdoptableLayer {
  file: string;
  digests: StreamedDigests | null;
}

/**
 * Makes `stagedFile` (already in the VDI's format at rest and fsynced) the
 * VDI's content: hard-link it (or its layer) as the next generation's file,
 * fsync the directory, then switch the row in one transaction. The old
 * generation and the staged name are removed after. A link rather than a
 * rename keeps the staged file in place until the switch, so a commit cut by
 * a crash can be run again from it (the orphan link is collected at startup).
 */
export async function commitContent(
  vdis: VdiStore,
  id: string,
  stagedFile: string,
  opts: CommitOptions = {},
): Promise<Vdi> {
  let vdi = vdis.get(id);
  // Every write path refuses a snapshot before its first byte; this is the last line.
  vdis.assertWritable(vdi, 'an import');
  const size = opts.virtualSize ?? vdi.virtual_size;
  const { generation, fileName, target, digestFile, digests } = nextNames(vdis, vdi);
  // The digests are written (and fsynced) before the switch names them; a
  // crash before it leaves a file no row names, collected at startup.
  const staged = await vdis.openFile(stagedFile, vdi.image_format, size);
  try {
    await writeBlockDigests(staged, digests, undefined, opts.digests);
  } catch (err) {
    throw spaceError(err, 'the commit');
  } finally {
    await staged.close();
  }
  await fsp.rm(target, { force: true }); // an orphan of an earlier attempt
  let released: string[];
  // A merge of this chain gives way, and the row is read again after it
  // (a merge may have moved the VDI's content onto its parent).
  const leave = await vdis.gate.enterCommit(() => vdis.chainIdsOf(vdis.get(id)));
  try {
    vdi = vdis.get(id);
    const layer = await writeLayer(vdis, vdi, stagedFile, target, size, digests);
    if (!layer) await fsp.link(stagedFile, target);
    await fsyncDir(vdis.srOf(vdi).path);
    released = switchGeneration(vdis, vdi, generation, fileName, layer, { ...opts, digestFile });
  } catch (err) {
    // Nothing points at the new name: the VDI keeps its content.
    await fsp.rm(target, { force: true });
    await fsp.rm(digests, { force: true });
    throw spaceError(err, 'the commit');
  } finally {
    leave();
  }
  await fsp.rm(stagedFile, { force: true });
  return afterSwitch(vdis, vdi, released);
}

/**
 * Lays the differencing image `delta` onto the VDI's content as a new layer
 * holding the delta's blocks that change what the VDI reads (a block the
 * delta rewrites with the bytes the VDI holds is left out), over the
 * nearest shared content: the VDI's own when a snapshot or clone holds it;
 * else, the VDI's content being an unshared layer, its parent, the new layer
 * carrying what the old one defined (the changes since the last snapshot).
 * The digests are the old ones with the changed blocks' entries replaced.
 *
 * Null, having changed nothing, when there is no shared content to lay a
 * layer over (a VDI without snapshots is one flat file; the caller rewrites
 * it as before) or the VDI's content has no digests to compare with.
 * `onBaseBytes` counts the bytes read of the VDI's content.
 */
export async function commitDelta(
  vdis: VdiStore,
  id: string,
  delta: BlockImage,
  deltaDefined: readonly DefinedRange[],
  opts: CommitOptions & {
    signal?: AbortSignal;
    onBaseBytes?: (n: number) => void;
    /**
     * `delta`'s blocks in a raw file already: in a raw SR it becomes the
     * layer (linked, not copied) when the delta defines whole 64 KiB blocks
     * and no unshared layer's blocks must be carried.
     */
    adopt?: AdoptableLayer;
  } = {},
): Promise<Vdi | null> {
  let vdi = vdis.get(id);
  vdis.assertWritable(vdi, 'an import');
  if (!LAYERED_FORMATS.has(vdi.image_format)) return null;
  let released: string[];
  let created: { target: string; digests: string } | null = null;
  /** An adopted file's ranges the layer does not define (blocks the delta rewrote identically), and its name. */
  let spare: { file: string; ranges: DefinedRange[] } | null = null;
  const leave = await vdis.gate.enterCommit(() => vdis.chainIdsOf(vdis.get(id)));
  try {
    vdi = vdis.get(id);
    const oldDigests = vdis.digestPath(vdi);
    const place = await parentOf(vdis, vdi);
    if (!place || !oldDigests) return null;
    const names = nextNames(vdis, vdi);
    created = names;
    const update = await DigestUpdate.create(oldDigests, names.digests, vdi.virtual_size);
    if (!update) return null;
    let layer: NewLayer;
    const size = vdi.virtual_size;
    const changed = blockRuns(deltaDefined, size);
    const adopt =
      opts.adopt && vdi.image_format === 'raw' && place.carry.length === 0 && wholeBlocks(deltaDefined, size)
        ? opts.adopt
        : null;
    try {
      if (adopt) {
        // The delta's file is the layer: its changed blocks named, none written again.
        const { defined, unchanged } = await adoptLayer(adopt, changed, update, size, opts);
        await fsp.rm(names.target, { force: true });
        await fsp.link(adopt.file, names.target);
        layer = { parent: place.parent, defined: encodeDefined(defined) };
        if (unchanged.length > 0) spare = { file: names.target, ranges: unchanged };
      } else {
        const current = new CountingImage(await vdis.openImage(vdi), opts.onBaseBytes ?? (() => {}));
        const next = new ChainImage(size, [
          { image: delta, defined: deltaDefined },
          { image: current, defined: [{ start: 0, length: size }] },
        ]);
        try {
          const carry = blockRuns(place.carry, size);
          // A vhd layer reads its whole 2 MiB blocks from `next` again: the
          // carried ones need only be named, not read twice.
          const runs =
            vdi.image_format === 'vhd'
              ? andRanges(deltaRuns(next, changed, [], update, opts), carry)
              : deltaRuns(next, changed, carry, update, opts);
          await fsp.rm(names.target, { force: true });
          const { defined } = await writeLayerFile(vdi.image_format, next, runs, names.target, place.parent, {
            signal: opts.signal,
          });
          layer = { parent: place.parent, defined: encodeDefined(defined) };
        } finally {
          // The delta is the caller's: only the VDI's content is closed here.
          await current.close();
        }
      }
      await update.finish();
    } catch (err) {
      await update.abort();
      throw err;
    }
    await fsyncDir(vdis.srOf(vdi).path);
    released = switchGeneration(vdis, vdi, names.generation, names.fileName, layer, {
      ...opts,
      digestFile: names.digestFile,
    });
    created = null;
  } catch (err) {
    throw spaceError(err, 'the commit');
  } finally {
    leave();
    if (created) {
      await fsp.rm(created.target, { force: true });
      await fsp.rm(created.digests, { force: true });
    }
  }
  // Only now (a finalize run again before the switch reads them as the delta's):
  // blocks of an adopted file the layer leaves to its parent give their space back.
  if (spare) await punchSpare(spare.file, spare.ranges);
  return afterSwitch(vdis, vdi, released);
}

/**
 * The entries of the blocks of `changed` (all in `adopt.file`) as the digest
 * update's new ones where they differ from the content's: those blocks are
 * the layer's `defined`; the others (rewritten with the bytes the VDI holds)
 * are `unchanged`. Entries hashed on the way are taken as they are; the
 * other blocks are read from the file and hashed.
 */
async function adoptLayer(
  adopt: AdoptableLayer,
  changed: [number, number][],
  update: DigestUpdate,
  size: number,
  opts: { signal?: AbortSignal },
): Promise<{ defined: DefinedRange[]; unchanged: DefinedRange[] }> {
  const B = DIGEST_BLOCK_BYTES;
  const E = DIGEST_ENTRY_BYTES;
  await adopt.digests?.settle();
  const known = adopt.digests?.virtualSize === size ? adopt.digests : null;
  const defined: DefinedRange[] = [];
  const unchanged: DefinedRange[] = [];
  const add = (to: DefinedRange[], start: number, end: number) => {
    const last = to[to.length - 1];
    if (last && last.start + last.length === start) last.length += end - start;
    else to.push({ start, length: end - start });
  };
  const file = await RawFileImage.open(adopt.file, { virtualSize: size });
  try {
    const buf = Buffer.allocUnsafe(DELTA_CHUNK_BLOCKS * B);
    const oldEntries = Buffer.alloc(DELTA_CHUNK_BLOCKS * E);
    const newEntries = Buffer.alloc(DELTA_CHUNK_BLOCKS * E);
    for (const [first, end] of changed) {
      for (let b = first; b < end; b += DELTA_CHUNK_BLOCKS) {
        opts.signal?.throwIfAborted();
        const n = Math.min(DELTA_CHUNK_BLOCKS, end - b);
        await update.entries(oldEntries, b, n);
        newEntries.fill(0, 0, n * E);
        const unknown: number[] = [];
        for (let k = 0; k < n; k++) if (!known?.entryInto(b + k, newEntries, k * E)) unknown.push(k);
        if (unknown.length > 0) {
          const from = unknown[0];
          const to = unknown[unknown.length - 1] + 1;
          const data = await file.readInto(
            buf.subarray(0, Math.min((to - from) * B, size - (b + from) * B)),
            (b + from) * B,
          );
          await blockEntriesInto(
            unknown.map((k) => data.subarray((k - from) * B, Math.min(data.length, (k - from + 1) * B))),
            newEntries,
            unknown.map((k) => k * E),
          );
        }
        let touched = false;
        for (let k = 0; k < n; k++) {
          const start = (b + k) * B;
          const stop = Math.min(size, start + B);
          if (newEntries.compare(oldEntries, k * E, (k + 1) * E, k * E, (k + 1) * E) !== 0) {
            add(defined, start, stop);
            touched = true;
          } else add(unchanged, start, stop);
        }
        if (touched) await update.set(b, newEntries, n);
      }
    }
  } finally {
    await file.close();
  }
  return { defined, unchanged };
}

/** Makes `ranges` of a layer file holes (best effort: they are outside what it defines). */
async function punchSpare(file: string, ranges: readonly DefinedRange[]): Promise<void> {
  const handle = await fsp.open(file, 'r+').catch(() => null);
  if (!handle) return;
  try {
    for (const r of ranges) await zeroRange(handle, r.start, r.length);
  } catch {
    // Space not given back is no harm: nothing reads there.
  } finally {
    await handle.close();
  }
}

/** Whether every range of `ranges` starts and ends on a 64 KiB block (or at the disk's end). */
function wholeBlocks(ranges: readonly DefinedRange[], size: number): boolean {
  return ranges.every(
    (r) =>
      r.start % DIGEST_BLOCK_BYTES === 0 &&
      ((r.start + r.length) % DIGEST_BLOCK_BYTES === 0 || r.start + r.length >= size),
  );
}

function nextNames(vdis: VdiStore, vdi: Vdi) {
  const dir = vdis.srOf(vdi).path;
  const generation = vdi.generation + 1;
  const fileName = generationFileName(vdi.id, generation, vdi.image_format);
  const digestFile = digestFileName(vdi.id, generation);
  return {
    generation,
    fileName,
    target: path.join(dir, fileName),
    digestFile,
    digests: path.join(dir, digestFile),
  };
}

/** After the switch: merges planned, cached images and the old files dropped. */
async function afterSwitch(vdis: VdiStore, vdi: Vdi, released: string[]): Promise<Vdi> {
  vdis.onChainsChanged();
  vdis.images.drop(vdi.id);
  await vdis.dropDigests(vdi);
  await vdis.unlinkReleased(vdi, released);
  return vdis.get(vdi.id);
}

/**
 * The content a new layer of `vdi` goes over: its own when it is shared (a
 * snapshot or clone names it, or a layer is built over it), else its
 * parent, the ranges of the unshared layer being `carry` (the new layer
 * must define them too). Null when the VDI's content is flat and its own:
 * a commit then stays flat. A shared parent gets its id-named file.
 */
async function parentOf(vdis: VdiStore, vdi: Vdi): Promise<{ parent: string; carry: DefinedRange[] } | null> {
  const shared = vdis.contents.holders(vdi.content_id, vdi.id) > 0;
  const row = vdis.contents.get(vdi.content_id);
  const parent = shared ? vdi.content_id : (row?.parent ?? null);
  if (parent === null) return null;
  if (shared && parent !== vdi.file_name) {
    // A parent is read under its id: give it that name back (a clone's or
    // snapshot's file is another link of the same inode).
    await fsp.link(vdis.imagePath(vdi), path.join(vdis.srOf(vdi).path, parent)).catch((err) => {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    });
  }
  return { parent, carry: shared || !row ? [] : decodeDefined(row) };
}

/**
 * For a VDI whose content is shared or is a layer already: writes at
 * `target` the layer of `stagedFile` over the parent it must have, so the
 * commit costs space for the blocks that differ only. Null when the commit
 * stays flat (no snapshot in the VDI's history: today's fast path). Where
 * the parent has digests, the staged disk's (`stagedDigests`) tell the
 * blocks that differ, and the parent is not read.
 */
async function writeLayer(
  vdis: VdiStore,
  vdi: Vdi,
  stagedFile: string,
  target: string,
  virtualSize: number,
  stagedDigests: string,
): Promise<NewLayer | null> {
  if (!LAYERED_FORMATS.has(vdi.image_format)) return null;
  const place = await parentOf(vdis, vdi);
  if (!place) return null;
  const next = await vdis.openFile(stagedFile, vdi.image_format, virtualSize);
  try {
    const parentDigests = vdis.contentDigestPath(vdi, place.parent);
    const byDigests = parentDigests ? await digestDiffRuns(next, stagedDigests, parentDigests) : null;
    if (byDigests) {
      const { defined } = await writeLayerFile(vdi.image_format, next, byDigests, target, place.parent);
      return { parent: place.parent, defined: encodeDefined(defined) };
    }
    const base = new CountingImage(await vdis.openContent(vdi, place.parent), (n) =>
      vdis.countDeltaBaseBytes(n),
    );
    try {
      const runs = diffBlocks(next, base);
      const { defined } = await writeLayerFile(vdi.image_format, next, runs, target, place.parent);
      return { parent: place.parent, defined: encodeDefined(defined) };
    } finally {
      await base.close();
    }
  } finally {
    await next.close();
  }
}

/**
 * The runs a delta commit's layer defines, in order: the blocks of
 * `changed` (those the delta touches) whose bytes in `next` differ from what
 * the VDI reads (their digests tell, so the VDI is not read), their new
 * entries written to `update`; and every block of `carry`, as `next` reads
 * it. Data runs are views valid until the generator resumes.
 */
async function* deltaRuns(
  next: BlockImage,
  changed: [number, number][],
  carry: [number, number][],
  update: DigestUpdate,
  opts: { signal?: AbortSignal },
): AsyncGenerator<DiffRun> {
  const B = DIGEST_BLOCK_BYTES;
  const E = DIGEST_ENTRY_BYTES;
  const size = next.virtualSize;
  const buf = Buffer.allocUnsafe(DELTA_CHUNK_BLOCKS * B);
  const oldEntries = Buffer.alloc(DELTA_CHUNK_BLOCKS * E);
  const newEntries = Buffer.alloc(DELTA_CHUNK_BLOCKS * E);
  let c = 0;
  for (const [first, end] of unionRuns(changed, carry)) {
    for (let b = first; b < end; b += DELTA_CHUNK_BLOCKS) {
      opts.signal?.throwIfAborted();
      const n = Math.min(DELTA_CHUNK_BLOCKS, end - b);
      const data = await next.readInto(buf.subarray(0, Math.min(n * B, size - b * B)), b * B);
      await update.entries(oldEntries, b, n);
      oldEntries.copy(newEntries, 0, 0, n * E);
      // The new entries of the blocks the delta touches, hashed together (on the thread pool).
      const hashing: Buffer[] = [];
      const at: number[] = [];
      const isChanged = new Uint8Array(n);
      for (let k = 0, h = c; k < n; k++) {
        while (h < changed.length && changed[h][1] <= b + k) h++;
        if (h < changed.length && changed[h][0] <= b + k) {
          isChanged[k] = 1;
          hashing.push(data.subarray(k * B, Math.min(data.length, (k + 1) * B)));
          at.push(k * E);
        }
      }
      await blockEntriesInto(hashing, newEntries, at);
      let touched = false;
      let run: DiffRun | null = null;
      for (let k = 0; k < n; k++) {
        const block = b + k;
        while (c < changed.length && changed[c][1] <= block) c++;
        const from = k * B;
        const to = Math.min(data.length, from + B);
        let keep = false;
        if (isChanged[k]) {
          if (newEntries.compare(oldEntries, k * E, (k + 1) * E, k * E, (k + 1) * E) !== 0) {
            keep = touched = true;
          }
        }
        if (!keep && !inRuns(carry, block)) {
          if (run) yield run;
          run = null;
          continue;
        }
        const zero = isZero(data, from, to);
        if (run && run.zero === zero && run.start + run.length === b * B + from) {
          run.length += to - from;
          if (!zero) run.data = data.subarray(run.start - b * B, to);
          continue;
        }
        if (run) yield run;
        run = {
          start: b * B + from,
          length: to - from,
          zero,
          ...(zero ? {} : { data: data.subarray(from, to) }),
        };
      }
      if (run) yield run;
      if (touched) await update.set(b, newEntries, n);
    }
  }
}

/** `runs`, then the blocks of `blocks` as data runs without their bytes (for a writer that reads them itself). */
async function* andRanges(runs: AsyncIterable<DiffRun>, blocks: [number, number][]): AsyncGenerator<DiffRun> {
  yield* runs;
  for (const [first, end] of blocks) {
    yield { start: first * DIGEST_BLOCK_BYTES, length: (end - first) * DIGEST_BLOCK_BYTES, zero: false };
  }
}

/** The 64 KiB blocks `ranges` (sorted) touch, within a disk of `size`, as merged runs [first, end). */
function blockRuns(ranges: readonly DefinedRange[], size: number): [number, number][] {
  const out: [number, number][] = [];
  for (const r of ranges) {
    const end = Math.min(size, r.start + r.length);
    if (end <= r.start) continue;
    const first = Math.floor(r.start / DIGEST_BLOCK_BYTES);
    const last = Math.ceil(end / DIGEST_BLOCK_BYTES);
    const prev = out[out.length - 1];
    if (prev && first <= prev[1]) prev[1] = Math.max(prev[1], last);
    else out.push([first, last]);
  }
  return out;
}

function unionRuns(a: [number, number][], b: [number, number][]): [number, number][] {
  const all = [...a, ...b].sort((x, y) => x[0] - y[0]);
  const out: [number, number][] = [];
  for (const [first, end] of all) {
    const prev = out[out.length - 1];
    if (prev && first <= prev[1]) prev[1] = Math.max(prev[1], end);
    else out.push([first, end]);
  }
  return out;
}

/** Whether `block` lies in `runs` (sorted, merged): a binary search. */
function inRuns(runs: [number, number][], block: number): boolean {
  let lo = 0;
  let hi = runs.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    if (runs[mid][1] <= block) lo = mid + 1;
    else if (runs[mid][0] > block) hi = mid - 1;
    else return true;
  }
  return false;
}

/** The one transaction that makes the new generation the VDI's content; returns the contents it released. */
function switchGeneration(
  vdis: VdiStore,
  vdi: Vdi,
  generation: number,
  fileName: string,
  layer: NewLayer | null,
  opts: { virtualSize?: number; inTransaction?: (generation: number) => void; digestFile: string },
): string[] {
  return vdis.inTransaction(() => {
    const now = nowIso();
    const virtualSize = opts.virtualSize ?? vdi.virtual_size;
    if (layer) {
      // A flat parent gets its row now (a layer parent has one).
      if (layer.parent === vdi.content_id) {
        vdis.contents.keepAsParent(layer.parent, vdi.sr_id, vdi.virtual_size, now);
      }
      vdis.contents.insert({
        id: fileName,
        sr_id: vdi.sr_id,
        parent: layer.parent,
        defined: layer.defined,
        virtual_size: virtualSize,
        created_at: now,
      });
    }
    vdis.switchRow(vdi.id, {
      generation,
      fileName,
      virtualSize,
      updatedAt: now,
      digestFile: opts.digestFile,
    });
    opts.inTransaction?.(generation);
    return vdis.contents.release(vdi.content_id);
  });
}
