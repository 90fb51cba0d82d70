/**
 * Fault injection for what a test cannot arrange on a real disk: one write
 * that fails (EIO: a failing disk; ENOSPC at one precise write: a disk that
 * fills up, which full-disk.test.ts also does for real on a small tmpfs).
 * Everything else stays the real code path.
 */
import { DirectWriter } from '../../src/image/direct-writer.js';

/**
 * Makes the `nth` gathered write of any DirectWriter fail with `code` (as a
 * full disk fails it, by default), until `restore()`. `writes` counts the
 * writes tried.
 */
export function failNthDirectWrite(
  nth: number,
  code: 'ENOSPC' | 'EIO' = 'ENOSPC',
): { restore: () => void; readonly writes: number } {
  const proto = DirectWriter.prototype as unknown as { writeOut: (...args: unknown[]) => Promise<void> };
  const realWriteOut = proto.writeOut;
  let writes = 0;
  proto.writeOut = function (this: unknown, ...args: unknown[]) {
    if (++writes !== nth) return realWriteOut.apply(this, args);
    const message = code === 'EIO' ? 'EIO: i/o error, write' : 'ENOSPC: no space left on device, write';
    return Promise.reject(Object.assign(new Error(message), { code }));
  };
  return {
    restore: () => {
      proto.writeOut = realWriteOut;
    },
    get writes() {
      return writes;
    },
  };
}
