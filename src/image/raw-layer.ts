/**
 * A raw layer of a chain (docs/design.md, "Chains at rest"): a sparse file of
 * the disk's size holding only the blocks where the new disk differs from its
 * parent, and the ranges it defines. A defined range that is a hole in the
 * file reads as zeros (zeros written over the parent's data cost no space).
 * The ranges are kept by the caller (the metadata store), not in the file.
 */
import { constants as fsConstants, promises as fsp } from 'node:fs';
import type { DiffRun } from './block-diff.js';
import type { DefinedRange } from './chain-image.js';
import { DirectWriter } from './direct-writer.js';
import { PRIVATE_FILE_MODE } from './file-io.js';

/**
 * Writes at `file` (created, or truncated) the layer of a disk of
 * `virtualSize` defining `runs` (in order: diffBlocks' of the new disk over
 * its parent, say), fsyncs it, and returns the ranges it defines, sorted and
 * merged. Memory: what one run holds, whatever the disk's size.
 */
export async function writeRawLayer(
  runs: AsyncIterable<DiffRun>,
  virtualSize: number,
  file: string,
): Promise<{ defined: DefinedRange[]; dataBytes: number }> {
  const handle = await fsp.open(
    file,
    fsConstants.O_RDWR | fsConstants.O_CREAT | fsConstants.O_TRUNC,
    PRIVATE_FILE_MODE,
  );
  const defined: DefinedRange[] = [];
  let dataBytes = 0;
  let writer: DirectWriter | null = null;
  try {
    await handle.truncate(virtualSize);
    // Gathered and written with O_DIRECT, one write in flight while the next
    // runs are made: the device works beside the reads and hashing, instead
    // of all at the fsync.
    writer = await DirectWriter.open(file, handle);
    for await (const run of runs) {
      if (run.data) {
        await writer.write(run.data.subarray(0, run.length), run.start);
        dataBytes += run.length;
      }
      const last = defined[defined.length - 1];
      if (last && last.start + last.length === run.start) last.length += run.length;
      else defined.push({ start: run.start, length: run.length });
    }
    await writer.flush();
    await handle.sync();
  } finally {
    await writer?.close();
    await handle.close();
  }
  return { defined, dataBytes };
}
