/**
 * Changed blocks between two points of one VDI's history: a snapshot and a
 * later snapshot of the same VDI, or a snapshot and the live VDI. Answered
 * from the block digests the two contents were committed with
 * (storage/block-digests.ts), never from their data; a block rewritten with
 * identical bytes is not changed. Where either content has no digests (it
 * was committed before they were kept), the answer is 409
 * CHANGED_BLOCKS_UNKNOWN, never a guess.
 */
import { ApiError } from '../errors.js';
import type { Extent } from '../image/block-image.js';
import { blockCount, changedBlockRuns, DIGEST_BLOCK_BYTES } from '../storage/block-digests.js';
import type { Vdi, VdiStore } from '../storage/vdis.js';

export { DIGEST_BLOCK_BYTES as CHANGED_BLOCK_BYTES };

/** A digest file may go with a commit between reading the row and opening it: read the row again. */
const ATTEMPTS = 3;

export interface ChangedBlocks {
  vdi: Vdi;
  base: Vdi;
  /** Sorted runs [first, end) of changed 64 KiB block indices. */
  runs: [number, number][];
}

/** The VDI a snapshot was taken of, or the VDI itself. */
function originOf(vdi: Vdi): string | null {
  return vdi.is_snapshot ? vdi.snapshot_of : vdi.id;
}

/**
 * Checks that `baseId` names a snapshot of the same VDI as `vdi` (which may
 * itself be that VDI or another of its snapshots) and returns it.
 */
export function baseSnapshotOf(vdis: VdiStore, vdi: Vdi, baseId: string): Vdi {
  const base = vdis.get(baseId);
  if (!base.is_snapshot) {
    throw new ApiError(
      'INVALID_REQUEST',
      `base ${base.id} is not a snapshot; name a snapshot of VDI ${originOf(vdi) ?? vdi.id} (GET /v1/vdis/${vdi.id}/snapshots)`,
      { vdi: vdi.id, base: base.id },
    );
  }
  if (base.snapshot_of === null || base.snapshot_of !== originOf(vdi)) {
    throw new ApiError(
      'CHANGED_BLOCKS_UNKNOWN',
      `snapshot ${base.id} is not a snapshot of VDI ${originOf(vdi) ?? vdi.id}: diskport keeps changed blocks only ` +
        `within one VDI's history; name one of its own snapshots, or export the whole disk`,
      { vdi: vdi.id, base: base.id, base_snapshot_of: base.snapshot_of },
    );
  }
  return base;
}

export async function changedBlocks(vdis: VdiStore, vdiId: string, baseId: string): Promise<ChangedBlocks> {
  for (let attempt = 1; ; attempt++) {
    const vdi = vdis.get(vdiId);
    const base = baseSnapshotOf(vdis, vdi, baseId);
    const [a, b] = [vdis.digestPath(base), vdis.digestPath(vdi)];
    const runs = a && b ? await changedBlockRuns(a, b, blockCount(vdi.virtual_size)) : null;
    if (runs) return { vdi, base, runs };
    const moved = vdis.get(vdiId).generation !== vdi.generation;
    if (moved && attempt < ATTEMPTS) continue;
    throw new ApiError(
      'CHANGED_BLOCKS_UNKNOWN',
      `diskport cannot tell which blocks of VDI ${vdi.id} changed since snapshot ${base.id}: ` +
        `${a ? 'the VDI' : 'the snapshot'}'s content was stored before changed blocks were kept; ` +
        'export the whole disk (and take a new snapshot as the next base)',
      { vdi: vdi.id, base: base.id },
    );
  }
}

/** The changed runs as extents covering [0, virtualSize) (ovirt-imageio's `context=dirty` shape). */
export function dirtyExtents(
  virtualSize: number,
  runs: readonly [number, number][],
): (Extent & { dirty: boolean })[] {
  const out: { start: number; length: number; dirty: boolean; zero: boolean }[] = [];
  let pos = 0;
  const push = (end: number, dirty: boolean) => {
    if (end > pos) out.push({ start: pos, length: end - pos, dirty, zero: false });
    pos = end;
  };
  for (const [first, end] of runs) {
    push(Math.min(virtualSize, first * DIGEST_BLOCK_BYTES), false);
    push(Math.min(virtualSize, end * DIGEST_BLOCK_BYTES), true);
  }
  push(virtualSize, false);
  return out;
}

/** One bit per 64 KiB block, most significant bit first (xapi's VDI.list_changed_blocks). */
export function changedBitmap(virtualSize: number, runs: readonly [number, number][]): Buffer {
  const bitmap = Buffer.alloc(Math.ceil(blockCount(virtualSize) / 8));
  for (const [first, end] of runs) {
    for (let b = first; b < end; b++) bitmap[b >> 3] |= 0x80 >> (b & 7);
  }
  return bitmap;
}
