/** Reading the changed-blocks bitmaps diskport answers (xapi's shape: one bit per 64 KiB block, most significant bit first). */
import assert from 'node:assert/strict';

/** The bits of `bitmap` (base64) for `blocks` blocks; its length must be whole bytes for exactly them. */
export function bitsOf(bitmap: string, blocks: number): boolean[] {
  const bytes = Buffer.from(bitmap, 'base64');
  assert.equal(bytes.length, Math.ceil(blocks / 8), 'one bit per 64 KiB block, whole bytes');
  return Array.from({ length: blocks }, (_, i) => (bytes[i >> 3] & (0x80 >> (i & 7))) !== 0);
}

/** How many bits of `bitmap` (base64) are set: the changed blocks. */
export function bitsSet(bitmap: string): number {
  let n = 0;
  for (const byte of Buffer.from(bitmap, 'base64')) for (let b = byte; b; b >>= 1) n += b & 1;
  return n;
}
