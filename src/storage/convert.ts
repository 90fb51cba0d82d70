/**
 * Writes a disk into a new file of a format at rest: the last step of every
 * import that is not a same-format rename. Only allocated data is copied;
 * zeros stay holes, so the cost follows the data, not the virtual size.
 * The caller owns the file's fate (rename or unlink).
 */
import { promises as fsp } from 'node:fs';
import { codecFor } from '../formats/index.js';
import { readVirtual } from '../formats/raw/index.js';
import type { SerializedImage } from '../formats/types.js';
import type { BlockImage } from './block-image.js';
import { forEachDataRun } from './zero.js';

export interface CopyProgress {
  signal?: AbortSignal;
  /** Called with the number of bytes written so far, as they are written. */
  onBytes?: (n: number) => void;
}

/** Writes the chunks of `stream` over [start, end) to `handle` at their offsets, leaving zero blocks as holes. */
async function writeSparse(
  handle: fsp.FileHandle,
  chunks: AsyncIterable<Buffer>,
  start: number,
  progress: CopyProgress,
): Promise<void> {
  let pos = start;
  for await (const chunk of chunks) {
    progress.signal?.throwIfAborted();
    const base = pos;
    const writes: Promise<unknown>[] = [];
    forEachDataRun(chunk, chunk.length, base, (s, e) => {
      writes.push(handle.write(chunk, s, e - s, base + s));
    });
    await Promise.all(writes);
    pos += chunk.length;
    progress.onBytes?.(chunk.length);
  }
}

export async function convertInto(
  image: BlockImage,
  format: string,
  destPath: string,
  progress: CopyProgress = {},
): Promise<void> {
  const handle = await fsp.open(destPath, 'w');
  try {
    if (format === 'raw') {
      await handle.truncate(image.virtualSize);
      const extents = await image.extents();
      for (const e of extents) {
        if (e.zero) continue;
        await writeSparse(
          handle,
          readVirtual(image, extents, e.start, e.start + e.length),
          e.start,
          progress,
        );
      }
    } else {
      const stream: SerializedImage = await codecFor(format).serialize(image);
      await handle.truncate(stream.size);
      await writeSparse(handle, stream.read(0, stream.size), 0, progress);
    }
    await handle.sync();
  } finally {
    await handle.close();
  }
}
