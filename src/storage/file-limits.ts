/**
 * The largest file an SR's file system can hold. A raw VDI is one file of its
 * virtual size, so a raw disk larger than that (ext4 with 4 KiB blocks stops
 * at 16 TiB - 4 KiB; statfs does not say) could never be created, nor filled
 * by an import: it is refused at create, naming the limit.
 *
 * Found by a probe at startup: a sparse file truncated to ever closer sizes
 * (EFBIG past the limit), which allocates no block and takes microseconds.
 */
import { randomUUID } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { PRIVATE_FILE_MODE } from '../image/file-io.js';

/** Names of probe files in a staging directory (startup cleanup knows them as diskport's). */
export const PROBE_PREFIX = 'probe-';

/** Sizes are found to this granularity (a file system block). */
const PROBE_STEP_BYTES = 4096;

/**
 * The largest size up to `ceiling` that a file in `dir` can be truncated to;
 * `ceiling` itself when the file system allows at least that. Null when the
 * probe cannot run (no file can be created: a full or read-only disk).
 */
export async function probeMaxFileSize(dir: string, ceiling: number): Promise<number | null> {
  const file = path.join(dir, `${PROBE_PREFIX}${randomUUID()}`);
  let handle: fsp.FileHandle;
  try {
    handle = await fsp.open(file, 'w', PRIVATE_FILE_MODE);
  } catch {
    return null;
  }
  const fits = async (size: number): Promise<boolean> => {
    try {
      await handle.truncate(size);
      return true;
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'EFBIG' || code === 'EINVAL') return false;
      throw err;
    }
  };
  try {
    if (await fits(ceiling)) return ceiling;
    // Invariant: `lo` fits, `hi` does not.
    let lo = 0;
    let hi = ceiling;
    while (hi - lo > PROBE_STEP_BYTES) {
      const half = Math.floor((hi - lo) / 2 / PROBE_STEP_BYTES) * PROBE_STEP_BYTES;
      const mid = lo + Math.max(PROBE_STEP_BYTES, half);
      if (await fits(mid)) lo = mid;
      else hi = mid;
    }
    return lo;
  } catch {
    return null;
  } finally {
    await handle.close().catch(() => {});
    await fsp.rm(file, { force: true });
  }
}
