/**
 * Comparing secrets (bearer tokens, transfer tokens, xapi session ids) in
 * constant time. At the bottom of the layers: both the HTTP layer and the
 * transfer sessions check secrets.
 */
import { timingSafeEqual } from 'node:crypto';

export function safeEqual(a: string, b: string): boolean {
  const ab = Buffer.from(a);
  const bb = Buffer.from(b);
  return ab.length === bb.length && timingSafeEqual(ab, bb);
}
