/**
 * Parsing and checking of the headers a resumable upload sends: Content-Range
 * (RFC 9110 §14.4, in a request) and Content-Digest (RFC 9530).
 */
import { ApiError } from '../errors.js';
import type { ChunkRange } from '../transfer/sessions.js';

const CONTENT_RANGE = /^bytes\s+(?:(\d+)-(\d+)|\*)\/(\d+|\*)$/i;

/**
 * `bytes a-b/total`, `bytes a-b/*`, or `bytes *\/total` (declares the total
 * only; `start` > `end` then marks an empty chunk). Throws 400 when malformed.
 */
export function parseContentRange(header: string): ChunkRange {
  const m = CONTENT_RANGE.exec(header.trim());
  const total = m?.[3] === '*' ? null : Number(m?.[3]);
  if (!m || (total !== null && !Number.isSafeInteger(total)) || (m[1] === undefined && total === null)) {
    throw new ApiError(
      'INVALID_CONTENT_RANGE',
      `Content-Range '${header}' is not 'bytes <first>-<last>/<total>' (or /*): name the chunk's first and last byte`,
    );
  }
  if (m[1] === undefined) return { start: 0, end: -1, total };
  const start = Number(m[1]);
  const end = Number(m[2]);
  if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || end < start) {
    throw new ApiError(
      'INVALID_CONTENT_RANGE',
      `Content-Range '${header}' has its last byte before its first`,
    );
  }
  if (total !== null && end >= total) {
    throw new ApiError(
      'INVALID_CONTENT_RANGE',
      `Content-Range '${header}' ends at or past its own total of ${total} bytes`,
    );
  }
  return { start, end, total };
}

const DIGEST_ALGORITHMS = { 'sha-256': 'sha256', 'sha-512': 'sha512' } as const;

/**
 * The strongest digest we know in a Content-Digest dictionary
 * (`sha-256=:<base64>:`); null when it names only algorithms we do not know,
 * which RFC 9530 lets a recipient ignore.
 */
export function parseContentDigest(header: string): { algorithm: 'sha256' | 'sha512'; value: Buffer } | null {
  let found: { algorithm: 'sha256' | 'sha512'; value: Buffer } | null = null;
  for (const member of header.split(',')) {
    const m = /^\s*([a-z0-9-]+)\s*=\s*:([A-Za-z0-9+/=]*):\s*$/i.exec(member);
    if (!m) {
      throw new ApiError(
        'INVALID_CONTENT_DIGEST',
        `Content-Digest '${header}' is not a list of <algorithm>=:<base64>: entries`,
      );
    }
    const algorithm = DIGEST_ALGORITHMS[m[1].toLowerCase() as keyof typeof DIGEST_ALGORITHMS];
    if (!algorithm) continue;
    const value = Buffer.from(m[2], 'base64');
    if (value.length !== (algorithm === 'sha256' ? 32 : 64)) {
      throw new ApiError('INVALID_CONTENT_DIGEST', `Content-Digest ${m[1]} has the wrong length`);
    }
    if (!found || algorithm === 'sha512') found = { algorithm, value };
  }
  return found;
}
