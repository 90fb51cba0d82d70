/**
 * Delta imports: a differencing image (a VHD of disk type 4, a qcow2 overlay
 * naming a backing file) applied onto a VDI. The blocks the delta defines
 * replace the VDI's; everything else keeps the VDI's content. The delta is
 * opened as the top layer of a chain over the VDI's current image
 * (image/chain-image.ts), and that composed disk is committed like any other
 * import (commit.ts): atomically, as a new generation, so a failed,
 * cancelled or malformed delta leaves the VDI as it was. In a raw SR with
 * snapshots, the commit's layer holds only the blocks that really differ.
 *
 * `base` says what the delta was made against. A snapshot's id: the import
 * goes ahead only if the VDI still holds what that snapshot holds, compared
 * by content id or by the block digests of both (never by reading data),
 * else 409 BASE_MISMATCH naming both. `current`: the delta is laid onto
 * whatever the VDI holds (xapi's `/import_raw_vdi` does that with any
 * differencing VHD).
 */
import { ApiError } from '../errors.js';
import type { DifferencingImage } from '../formats/types.js';
import type { BlockImage } from '../image/block-image.js';
import { ChainImage } from '../image/chain-image.js';
import { CountingImage } from '../image/counting-image.js';
import { RawFileImage } from '../image/raw-file-image.js';
import { blockCount, changedBlockRuns, DIGEST_BLOCK_BYTES } from '../storage/block-digests.js';
import type { Vdi, VdiStore } from '../storage/vdis.js';

/** `base=current`: lay the delta onto the VDI as it is, unchecked. */
export const BASE_CURRENT = 'current';

/**
 * Refuses a base that cannot be one: raw has no way to leave blocks out,
 * and a base must name a snapshot (or be `current`).
 */
export function checkBaseRequest(
  vdis: VdiStore,
  format: string,
  base: string,
  /** An upload session's chunks (raw): the ranges it writes are its delta. */
  rawRanges = false,
): void {
  if (format === 'raw' && !rawRanges) {
    throw new ApiError(
      'INVALID_REQUEST',
      'base= takes a differencing image (format vhd or qcow2); a raw image has no way to leave blocks out: ' +
        'send the whole disk without base, or its changed ranges as chunks of an upload session opened with ' +
        'format raw and this base (POST /v1/transfers)',
      { format, base },
    );
  }
  if (base === BASE_CURRENT) return;
  const snapshot = vdis.get(base);
  if (!snapshot.is_snapshot) {
    throw new ApiError(
      'INVALID_REQUEST',
      `base ${base} is not a snapshot: name the snapshot the delta was made against, or base=current`,
      { base },
    );
  }
}

/**
 * Throws 409 BASE_MISMATCH unless `vdi` holds what snapshot `base` holds: the
 * same content, or block digests that agree everywhere (a commit that
 * rewrote identical bytes changes nothing). `current` always holds.
 */
export async function assertBase(vdis: VdiStore, vdi: Vdi, base: string): Promise<void> {
  if (base === BASE_CURRENT) return;
  const snapshot = vdis.get(base);
  if (snapshot.content_id === vdi.content_id && snapshot.virtual_size === vdi.virtual_size) return;
  const mismatch = (why: string, extra: Record<string, unknown> = {}) =>
    new ApiError(
      'BASE_MISMATCH',
      `VDI ${vdi.id} does not hold what snapshot ${snapshot.id} holds (${why}), so a delta made against that ` +
        `snapshot would not give the disk it describes; import the whole image, or a delta against what the VDI holds now`,
      { vdi: vdi.id, base: snapshot.id, ...extra },
    );
  if (snapshot.virtual_size !== vdi.virtual_size) {
    throw mismatch(`its size is ${vdi.virtual_size} bytes, the snapshot's ${snapshot.virtual_size}`, {
      vdi_virtual_size: vdi.virtual_size,
      base_virtual_size: snapshot.virtual_size,
    });
  }
  const [a, b] = [vdis.digestPath(snapshot), vdis.digestPath(vdi)];
  const runs = a && b ? await changedBlockRuns(a, b, blockCount(vdi.virtual_size)) : null;
  if (runs === null) {
    throw mismatch('one of them was stored before block digests were kept, so they cannot be compared');
  }
  if (runs.length > 0) {
    const blocks = runs.reduce((n, [first, end]) => n + end - first, 0);
    throw mismatch(
      `${blocks} block(s) of 64 KiB differ, the first at byte ${runs[0][0] * DIGEST_BLOCK_BYTES}`,
      {
        changed_bytes: blocks * DIGEST_BLOCK_BYTES,
      },
    );
  }
}

/**
 * A qcow2 delta whose clusters streamed into `file` as they arrived
 * (streaming-import.ts: a raw file of the disk's size holding them at their
 * guest offsets, completed by its finish()): read from that file, its ranges
 * told by the staged image's metadata (`staged`, which the caller closes).
 */
export async function streamedDelta(
  staged: DifferencingImage,
  file: string,
  virtualSize: number,
): Promise<DifferencingImage> {
  const data = await RawFileImage.open(file, { virtualSize });
  let closing: Promise<void> | null = null;
  return {
    virtualSize,
    parent: staged.parent,
    defined: () => staged.defined(),
    read: (offset, length) => data.read(offset, length),
    readInto: (buf, offset) => data.readInto(buf, offset),
    extents: () => data.extents(),
    // Closed by a chain that owns it and by the caller: once.
    close: () => {
      closing ??= data.close();
      return closing;
    },
  };
}

/**
 * The disk `delta` describes over the VDI's current content: a chain of the
 * two, the delta on top (past its end, if it is smaller, the VDI's content
 * stays). The chain owns both images: closing it closes the delta too.
 */
export async function layOnto(vdis: VdiStore, vdi: Vdi, delta: DifferencingImage): Promise<BlockImage> {
  const defined = await delta.defined();
  const current = new CountingImage(await vdis.openImage(vdi), (n) => vdis.countDeltaBaseBytes(n));
  return new ChainImage(vdi.virtual_size, [
    { image: delta, defined },
    { image: current, defined: [{ start: 0, length: vdi.virtual_size }] },
  ]);
}
