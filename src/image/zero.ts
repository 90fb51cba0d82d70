/** Zero detection and a shared source of zero bytes for holes. */

/** Granularity at which imports look for zeros to leave as holes (a file-system block). */
export const ZERO_BLOCK_BYTES = 4096;

/** Read-only by convention: sliced to serve holes without allocating. */
export const ZEROS = Buffer.alloc(4 * 1024 * 1024);

export function isZero(buf: Buffer, start = 0, end = buf.length): boolean {
  // Data rarely starts or ends with a zero byte: most blocks are answered without a compare.
  if (end > start && (buf[start] !== 0 || buf[end - 1] !== 0)) return false;
  let pos = start;
  while (pos < end) {
    const n = Math.min(end - pos, ZEROS.length);
    if (buf.compare(ZEROS, 0, n, pos, pos + n) !== 0) return false;
    pos += n;
  }
  return true;
}

/** A zero-filled view of `length` bytes, shared when it fits in ZEROS. */
export function zeroBuffer(length: number): Buffer {
  return length <= ZEROS.length ? ZEROS.subarray(0, length) : Buffer.alloc(length);
}

/**
 * Splits buf[0, length) into maximal runs of all-zero and non-zero
 * ZERO_BLOCK_BYTES blocks and calls `onRun(start, end, zero)` for each, in
 * order. Block boundaries are relative to `baseOffset`, the position of buf[0]
 * in the disk, so holes align with the file system's blocks.
 */
export function forEachRun(
  buf: Buffer,
  length: number,
  baseOffset: number,
  onRun: (start: number, end: number, zero: boolean) => void,
): void {
  let runStart = 0;
  let runZero: boolean | null = null;
  let pos = 0;
  while (pos < length) {
    const blockEnd = Math.min(length, pos + ZERO_BLOCK_BYTES - ((baseOffset + pos) % ZERO_BLOCK_BYTES));
    const zero = isZero(buf, pos, blockEnd);
    if (runZero !== null && zero !== runZero) {
      onRun(runStart, pos, runZero);
      runStart = pos;
    }
    runZero = zero;
    pos = blockEnd;
  }
  if (runZero !== null) onRun(runStart, length, runZero);
}

/** Calls `onData(start, end)` for each maximal run of non-zero blocks (see forEachRun). */
export function forEachDataRun(
  buf: Buffer,
  length: number,
  baseOffset: number,
  onData: (start: number, end: number) => void,
): void {
  forEachRun(buf, length, baseOffset, (s, e, zero) => {
    if (!zero) onData(s, e);
  });
}
