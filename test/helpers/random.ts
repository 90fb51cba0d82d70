/** Seeded randomness: tests are random but repeatable. */

/** mulberry32: floats in [0, 1). */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Random bytes from a seeded PRNG. */
export function seededBytes(length: number, seed: number): Buffer {
  const rnd = prng(seed);
  const buf = Buffer.allocUnsafe(length);
  for (let i = 0; i + 4 <= length; i += 4) buf.writeUInt32LE((rnd() * 2 ** 32) >>> 0, i);
  for (let i = length - (length % 4); i < length; i++) buf[i] = (rnd() * 256) | 0;
  return buf;
}

/** The same generator as 32-bit unsigned integers. */
export function prngU32(seed: number): () => number {
  const next = prng(seed);
  return () => (next() * 2 ** 32) >>> 0;
}
