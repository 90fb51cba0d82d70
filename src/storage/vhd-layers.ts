/**
 * Layers of vhd SRs (docs/design.md, "Layer files per SR format"): each is a
 * real differencing VHD (disk type 4) whose header names its parent's file
 * (its id, beside it) by the parent's unique id and two parent locators, as
 * XCP-ng's chains are. What a layer defines is also kept in the contents
 * table, and diskport's chain reader composes layers from it, as for raw and
 * qcow2.
 *
 * A layer holds whole 2 MiB blocks (every sector bit set, as the VHD
 * serializer writes them): a block with any 64 KiB that differs is written
 * whole from the new disk, its zero runs left as holes in the file.
 */
import { randomBytes } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import { EXPORT_BLOCK_SIZE_BYTES } from '../formats/vhd/serialize.js';
import type { DiffRun } from '../image/block-diff.js';
import type { BlockImage } from '../image/block-image.js';
import type { DefinedRange } from '../image/chain-image.js';
import { readAt } from '../image/file-io.js';
import { MaskedImage } from '../image/masked-image.js';
import { convertInto } from './convert.js';

/** Where a VHD footer (and its copy at offset 0) holds the unique id. */
const FOOTER_UUID_OFFSET = 68;

/**
 * Writes at `file` the differencing VHD over `parentFile` (named `parentName`
 * beside it) that makes `next` read right over its parent, `runs` being what
 * differs (in any order; their data is not used): the 2 MiB blocks in which
 * any of them lies, read from `next`.
 */
export async function writeVhdLayer(
  next: BlockImage,
  runs: AsyncIterable<DiffRun>,
  file: string,
  parentName: string,
  parentFile: string,
  opts: { signal?: AbortSignal } = {},
): Promise<{ defined: DefinedRange[] }> {
  const B = EXPORT_BLOCK_SIZE_BYTES;
  const size = next.virtualSize;
  const blocks: DefinedRange[] = [];
  for await (const run of runs) {
    const start = Math.floor(run.start / B) * B;
    const end = Math.min(size, Math.ceil((run.start + run.length) / B) * B);
    blocks.push({ start, length: end - start });
  }
  blocks.sort((a, b) => a.start - b.start);
  const defined: DefinedRange[] = [];
  for (const { start, length } of blocks) {
    const last = defined[defined.length - 1];
    if (last && start <= last.start + last.length)
      last.length = Math.max(last.length, start + length - last.start);
    else defined.push({ start, length });
  }
  await convertInto(new MaskedImage(next, defined), 'vhd', file, opts, {
    uuid: randomBytes(16),
    parent: { fileName: parentName, uuid: await vhdUuidOfFile(parentFile) },
  });
  return { defined };
}

/**
 * A merge of a vhd chain (storage/merges.ts, RewriteBackend): writes at
 * `file` `view` as a VHD with the unique id of `identityOf`'s footer, over
 * `parent` (differencing, holding `defined`: whole 2 MiB blocks) or flat
 * (dynamic, holding the view's data), fsynced.
 */
export async function rewriteVhdLayer(
  view: BlockImage,
  defined: readonly DefinedRange[] | null,
  file: string,
  identityOf: string,
  parent: { name: string; file: string } | null,
  opts: { signal?: AbortSignal; onBytes?: (n: number) => void },
): Promise<void> {
  const uuid = await vhdUuidOfFile(identityOf);
  await convertInto(defined === null ? view : new MaskedImage(view, defined), 'vhd', file, opts, {
    uuid,
    ...(parent ? { parent: { fileName: parent.name, uuid: await vhdUuidOfFile(parent.file) } } : {}),
  });
}

/** The unique id in a VHD file's footer (read from its copy at offset 0). */
export async function vhdUuidOfFile(file: string): Promise<Buffer> {
  const handle = await fsp.open(file, 'r');
  try {
    const head = await readAt(handle, Buffer.alloc(512), 0);
    return Buffer.from(head.subarray(FOOTER_UUID_OFFSET, FOOTER_UUID_OFFSET + 16));
  } finally {
    await handle.close();
  }
}
