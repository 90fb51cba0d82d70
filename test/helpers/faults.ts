/**
 * Fault injection for what a test machine cannot arrange without root: a
 * disk that fills up. Everything else stays the real code path.
 */
import { DirectWriter } from '../../src/image/direct-writer.js';

/**
 * Makes the `nth` gathered write of any DirectWriter fail with ENOSPC, as a
 * full disk fails it, until `restore()`. `writes` counts the writes tried.
 */
export function failNthDirectWrite(nth: number): { restore: () => void; readonly writes: number } {
  const proto = DirectWriter.prototype as unknown as { writeOut: (...args: unknown[]) => Promise<void> };
  const realWriteOut = proto.writeOut;
  let writes = 0;
  proto.writeOut = function (this: unknown, ...args: unknown[]) {
    if (++writes !== nth) return realWriteOut.apply(this, args);
    return Promise.reject(
      Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC' }),
    );
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
