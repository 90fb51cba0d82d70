/**
 * The tus 1.0 header that @tus/server does not parse: `Upload-Checksum`
 * (checksum extension, https://tus.io/protocols/resumable-upload#checksum):
 * `<algorithm> <base64 digest>` of the request body.
 */
import { ApiError } from '../errors.js';

export const TUS_CHECKSUM_ALGORITHMS = ['sha1', 'sha256', 'md5'] as const;
export type TusChecksumAlgorithm = (typeof TUS_CHECKSUM_ALGORITHMS)[number];

const DIGEST_BYTES: Record<TusChecksumAlgorithm, number> = { sha1: 20, sha256: 32, md5: 16 };
const UPLOAD_CHECKSUM = /^([A-Za-z0-9-]+) +([A-Za-z0-9+/]+={0,2})$/;

/** `sha256 <base64>` → algorithm and raw digest; 400 when malformed or the algorithm is not offered. */
export function parseUploadChecksum(header: string): { algorithm: TusChecksumAlgorithm; value: Buffer } {
  const m = UPLOAD_CHECKSUM.exec(header.trim());
  if (!m) {
    throw new ApiError(
      'INVALID_UPLOAD_CHECKSUM',
      `Upload-Checksum '${header}' is not '<algorithm> <base64 digest>', e.g. 'sha256 47DEQpj8...'`,
    );
  }
  const algorithm = m[1].toLowerCase() as TusChecksumAlgorithm;
  if (!TUS_CHECKSUM_ALGORITHMS.includes(algorithm)) {
    throw new ApiError(
      'UNSUPPORTED_CHECKSUM_ALGORITHM',
      `Upload-Checksum algorithm '${m[1]}' is not supported; use one of ${TUS_CHECKSUM_ALGORITHMS.join(', ')}`,
      { supported: [...TUS_CHECKSUM_ALGORITHMS] },
    );
  }
  const value = Buffer.from(m[2], 'base64');
  if (value.length !== DIGEST_BYTES[algorithm]) {
    throw new ApiError(
      'INVALID_UPLOAD_CHECKSUM',
      `Upload-Checksum: a ${algorithm} digest is ${DIGEST_BYTES[algorithm]} bytes, this one decodes to ${value.length}`,
    );
  }
  return { algorithm, value };
}
