/**
 * The end of every import: turn a complete staging file holding an image in
 * wire format F into the VDI's content, in the VDI's format at rest.
 *
 * - raw staged for a raw VDI: the staging file already is the image; rename.
 * - same container format (vhd/qcow2) at rest, same virtual size, and the
 *   file is already what diskport's own serializer writes for that disk
 *   (a diskport export, say): validated by opening it, then renamed without
 *   a copy.
 * - anything else: opened through its codec (which validates it) and
 *   converted into a new file of the at-rest format, then renamed. A qcow2
 *   or VHD from elsewhere is rewritten so, even into a VDI of its own
 *   format: whatever it carried beside the disk (snapshots, refcounts,
 *   feature bits, compressed clusters, a fixed VHD's layout) is not kept,
 *   every compressed cluster is inflated on the way (one that does not
 *   inflate refuses the import), and the file at rest is one diskport
 *   wrote, which `qemu-img check` passes. Or, when
 *   the upload streamed into its raw disk as it arrived, the rest of its data
 *   copied into that disk file (see streaming-import.ts).
 * Until the rename the VDI keeps its previous content; on any error the
 * staging files are removed and the VDI is untouched. A file system that
 * fills up on the way is a 507 INSUFFICIENT_SPACE, never an errno.
 */
import { promises as fsp } from 'node:fs';
import { ApiError, formatBytes, MalformedImageError } from '../errors.js';
import { codecFor } from '../formats/index.js';
import { type DifferencingImage, isDifferencing } from '../formats/types.js';
import type { BlockImage } from '../image/block-image.js';
import type { DefinedRange } from '../image/chain-image.js';
import { syncFile } from '../image/file-io.js';
import { RawFileImage } from '../image/raw-file-image.js';
import { isZeroFrom, ResizedImage } from '../image/resized-image.js';
import { spaceError } from '../image/space.js';
import { convertInto } from '../storage/convert.js';
import { commitDelta } from '../storage/layer-commit.js';
import type { StreamedDigests } from '../storage/streamed-digests.js';
import type { Vdi, VdiStore } from '../storage/vdis.js';
import type { RunningTask } from '../tasks/task-manager.js';
import { layOnto, streamedDelta } from './delta-import.js';
import { type ByteRange, RangeSet } from './range-set.js';
import type { StreamingImport } from './streaming-import.js';

/** One CHS cylinder at the largest geometry (16 heads x 255 sectors), with room to spare. */
const CHS_ROUNDING_MAX_BYTES = 4 * 1024 * 1024;

export async function commitStaged(
  vdis: VdiStore,
  vdi: Vdi,
  stagedFile: string,
  wireFormat: string,
  task: RunningTask,
  streamed: StreamingImport | null,
  /** Digests of the staged raw disk hashed as it arrived (a one-shot raw import), else null. */
  rawDigests: StreamedDigests | null,
  inTransaction?: (generation: number) => void,
  /**
   * Whether a differencing image (a delta) is laid onto the VDI's content
   * (its base checked by the caller); without it, one is refused (422).
   */
  opts: { differencing?: boolean } = {},
): Promise<Vdi> {
  const image =
    wireFormat === 'raw'
      ? await RawFileImage.open(stagedFile, { virtualSize: vdi.virtual_size })
      : await codecFor(wireFormat).open(stagedFile, { differencing: opts.differencing });
  let converted: string | null = null;
  let composed: BlockImage | null = null;
  let delta: DifferencingImage | null = null;
  try {
    // qemu-img rounds VHD sizes up to a CHS geometry (at most a cylinder):
    // a zero tail that small past the VDI's end is harmless. Anything larger
    // is refused outright, without reading what a hostile table claims.
    const excess = image.virtualSize - vdi.virtual_size;
    const chsRounding = wireFormat === 'vhd' && excess <= CHS_ROUNDING_MAX_BYTES;
    if (excess > 0 && !(chsRounding && (await isZeroFrom(image, vdi.virtual_size)))) {
      throw new ApiError(
        'TOO_LARGE',
        `image virtual size ${formatBytes(image.virtualSize)} exceeds VDI virtual size ${formatBytes(vdi.virtual_size)}; ` +
          'resize the VDI (PATCH virtual_size) or import into a larger one',
        { image_virtual_size: image.virtualSize, vdi_virtual_size: vdi.virtual_size },
      );
    }
    task.throwIfCancelled();
    if (isDifferencing(image)) {
      delta = image;
      let adopt: { file: string; digests: StreamedDigests | null } | undefined;
      if (streamed?.wroteDisk) {
        // A vhd streams nothing of a differencing image, unless its head
        // claimed another kind of disk than its trailing footer.
        if (wireFormat !== 'qcow2') {
          throw new MalformedImageError(
            wireFormat,
            'the start of the image describes another kind of disk than its footer',
          );
        }
        // A qcow2 delta into a raw VDI streamed its clusters into a raw file
        // (active-upload.ts): completed, it is the delta's data, and it may
        // become the layer itself, its bytes not written again (layer-commit.ts).
        await streamed.finish(
          image,
          { path: stagedFile, virtualSize: image.virtualSize },
          { signal: task.signal },
        );
        delta = await streamedDelta(image, streamed.destPath, vdi.virtual_size);
        adopt = { file: streamed.destPath, digests: streamed.digests };
      }
      // After a snapshot: a layer of the delta's changed blocks only, O(the delta).
      const layered = await commitDelta(
        vdis,
        vdi.id,
        delta,
        clipRanges(await image.defined(), vdi.virtual_size),
        {
          inTransaction,
          signal: task.signal,
          onBaseBytes: (n) => vdis.countDeltaBaseBytes(n),
          adopt,
        },
      );
      if (layered) return layered;
      // A VDI without snapshots is one flat file: rewritten whole, as any import.
      composed = await layOnto(vdis, vdi, delta);
      // Not `${stagedFile}.raw`: that may be the disk a streaming import opened.
      converted = `${stagedFile}.delta.${vdi.image_format}`;
      await convertInto(composed, vdi.image_format, converted, { signal: task.signal });
      await composed.close();
      const committed = await vdis.commitContent(vdi.id, converted, { inTransaction });
      converted = null;
      return committed;
    }
    const codec = codecFor(wireFormat);
    const renameAsIs =
      wireFormat === vdi.image_format &&
      image.virtualSize === vdi.virtual_size &&
      (wireFormat === 'raw' || ((await codec.isOwnLayout?.(image, stagedFile)) ?? false));
    if (renameAsIs) {
      await image.close();
      // commitContent links the file in as it is: it must be durable first.
      await syncFile(stagedFile);
      return await vdis.commitContent(vdi.id, stagedFile, {
        inTransaction,
        digests: wireFormat === 'raw' ? rawDigests : null,
      });
    }
    const source = image.virtualSize === vdi.virtual_size ? image : new ResizedImage(image, vdi.virtual_size);
    if (streamed) {
      await streamed.finish(
        source,
        { path: stagedFile, virtualSize: image.virtualSize },
        { signal: task.signal },
      );
      await image.close();
      return await vdis.commitContent(vdi.id, streamed.destPath, {
        inTransaction,
        digests: streamed.digests,
      });
    }
    converted = `${stagedFile}.${vdi.image_format}`;
    await convertInto(source, vdi.image_format, converted, { signal: task.signal });
    await image.close();
    // The converted disk reads as the staged one: a raw one's digests hold for it.
    const committed = await vdis.commitContent(vdi.id, converted, {
      inTransaction,
      digests: wireFormat === 'raw' ? rawDigests : null,
    });
    converted = null;
    return committed;
  } catch (err) {
    throw spaceError(err, 'the conversion into the VDI');
  } finally {
    await composed?.close().catch(() => {});
    if (delta !== image) await delta?.close().catch(() => {});
    await image.close().catch(() => {});
    if (converted) await fsp.rm(converted, { force: true });
  }
}

/** The VDI's bytes are copied into an in-place upload's unwritten ranges in pieces this large. */
const FILL_PIECE_BYTES = 4 * 1024 * 1024;

/**
 * Commits a raw upload that wrote part of the disk in place (an imageio
 * write ticket), `written` being the ranges it wrote (ordered, merged).
 * Where the VDI's content is shared (a snapshot or clone holds it) or is a
 * layer already, what the upload wrote is laid over it as a layer, exactly
 * as a delta import's blocks (commitDelta): the cost is the writes', not
 * the disk's. Else (a flat VDI with no snapshot, whose one file is replaced
 * whole by any import) the VDI's data is first copied into the ranges the
 * upload did not write, and the staged disk is committed as a whole upload.
 * Either way a crash before the switch leaves the VDI as it was, and a
 * restart runs this again from the staged bytes and the recorded ranges.
 */
export async function commitWrites(
  vdis: VdiStore,
  vdi: Vdi,
  stagedFile: string,
  written: readonly ByteRange[],
  task: RunningTask,
  inTransaction: (generation: number) => void,
): Promise<Vdi> {
  const staged = await RawFileImage.open(stagedFile, { virtualSize: vdi.virtual_size });
  try {
    const layered = await commitDelta(
      vdis,
      vdi.id,
      staged,
      written.map(([start, end]) => ({ start, length: end - start })),
      { inTransaction, signal: task.signal, onBaseBytes: (n) => vdis.countDeltaBaseBytes(n) },
    );
    if (layered) return layered;
  } finally {
    // commitDelta reports a full file system as 507 itself.
    await staged.close();
  }
  await fillUnwritten(vdis, vdi.id, stagedFile, written, task.signal);
  return commitStaged(vdis, vdi, stagedFile, 'raw', task, null, null, inTransaction);
}

/**
 * Copies the VDI's data into the ranges of the staged raw disk that
 * `written` leaves out. The staged file was created as one hole of the
 * disk's size, so the VDI's zero extents need nothing.
 */
async function fillUnwritten(
  vdis: VdiStore,
  vdiId: string,
  stagedFile: string,
  written: readonly ByteRange[],
  signal: AbortSignal,
): Promise<void> {
  const lease = await vdis.images.lease(vdiId);
  const handle = await fsp.open(stagedFile, 'r+');
  try {
    const buf = Buffer.allocUnsafe(FILL_PIECE_BYTES);
    const size = lease.image.virtualSize;
    const data = (await lease.extents()).filter((e) => !e.zero);
    let k = 0; // both lists are ordered: one walk
    for (const [gs, ge] of new RangeSet(written).missing(0, size)) {
      while (k < data.length && data[k].start + data[k].length <= gs) k++;
      for (let j = k; j < data.length && data[j].start < ge; j++) {
        const end = Math.min(ge, data[j].start + data[j].length);
        for (let at = Math.max(gs, data[j].start); at < end; at += FILL_PIECE_BYTES) {
          signal.throwIfAborted();
          const piece = await lease.image.readInto(buf.subarray(0, Math.min(FILL_PIECE_BYTES, end - at)), at);
          await handle.write(piece, 0, piece.length, at);
        }
      }
    }
  } catch (err) {
    throw spaceError(err, 'the commit');
  } finally {
    await handle.close();
    lease.release();
  }
}

/** `ranges` cut at `size` (a VHD's CHS rounding may reach past the VDI's end, with zeros). */
function clipRanges(ranges: readonly DefinedRange[], size: number): DefinedRange[] {
  return ranges
    .filter((r) => r.start < size)
    .map((r) => ({ start: r.start, length: Math.min(r.length, size - r.start) }));
}
