/**
 * ovirt-imageio's block checksum (`blkhash`), so that a client hashing its
 * source file locally gets the value the server answers for the image.
 *
 * The image is cut into blocks of `block_size` bytes from offset 0 (the last
 * one shorter when the size is not a multiple). Each block is hashed on its
 * own; the checksum is the hash of those block digests, concatenated in
 * order. For the blake2 algorithms every hash has a 32-byte digest (blake2b's
 * digest size is a parameter of the function, not a truncation). Since a
 * block's digest depends only on its bytes, a block that lies in zero extents
 * is hashed from a digest computed once per length, never read.
 */
import { createHash } from 'node:crypto';
import { setImmediate as yieldToEventLoop } from 'node:timers/promises';
import { blake2b } from '@noble/hashes/blake2b';
import { ApiError } from '../errors.js';
import type { BlockImage, Extent } from '../image/block-image.js';
import { RawFileImage } from '../image/raw-file-image.js';
import type { VdiStore } from '../storage/vdis.js';

export const BLKHASH_DEFAULT_ALGORITHM = 'blake2b';
export const BLKHASH_DEFAULT_BLOCK_BYTES = 4 * 1024 ** 2;
/** As imageio: a quarter to four times the default, 4 KiB aligned, so one request cannot hog memory. */
export const BLKHASH_MIN_BLOCK_BYTES = BLKHASH_DEFAULT_BLOCK_BYTES / 4;
export const BLKHASH_MAX_BLOCK_BYTES = BLKHASH_DEFAULT_BLOCK_BYTES * 4;
const BLOCK_ALIGNMENT_BYTES = 4096;
const BLAKE2_DIGEST_BYTES = 32;
const YIELD_INTERVAL_MS = 20;

/** Node's name for each algorithm; blake2b is computed apart (Node fixes its digest at 64 bytes). */
const NODE_NAMES = {
  blake2b: null,
  blake2s: 'blake2s256',
  md5: 'md5',
  sha1: 'sha1',
  sha224: 'sha224',
  sha256: 'sha256',
  sha384: 'sha384',
  sha512: 'sha512',
} as const;
export type BlkhashAlgorithm = keyof typeof NODE_NAMES;
export const BLKHASH_ALGORITHMS = Object.keys(NODE_NAMES).sort() as BlkhashAlgorithm[];

interface Hasher {
  update(data: Uint8Array): void;
  digest(): Uint8Array;
}

function hasher(algorithm: BlkhashAlgorithm): Hasher {
  const name = NODE_NAMES[algorithm];
  if (name === null) return blake2b.create({ dkLen: BLAKE2_DIGEST_BYTES });
  const h = createHash(name);
  return { update: (d) => h.update(d), digest: () => h.digest() };
}

export interface BlkhashParams {
  algorithm: BlkhashAlgorithm;
  blockSize: number;
}

/** `?algorithm=&block_size=` checked as imageio checks them; 400 otherwise. */
export function parseBlkhashParams(algorithm: unknown, blockSize: unknown): BlkhashParams {
  const name = algorithm === undefined || algorithm === '' ? BLKHASH_DEFAULT_ALGORITHM : String(algorithm);
  if (!(BLKHASH_ALGORITHMS as string[]).includes(name)) {
    throw new ApiError(
      'UNSUPPORTED_CHECKSUM_ALGORITHM',
      `unknown checksum algorithm '${name}'; use one of: ${BLKHASH_ALGORITHMS.join(', ')}`,
      { algorithm: name, supported: BLKHASH_ALGORITHMS },
    );
  }
  const size = blockSize === undefined || blockSize === '' ? BLKHASH_DEFAULT_BLOCK_BYTES : Number(blockSize);
  if (!Number.isSafeInteger(size)) {
    throw new ApiError('INVALID_REQUEST', `invalid block size: '${String(blockSize)}'; send a byte count`);
  }
  if (size < BLKHASH_MIN_BLOCK_BYTES || size > BLKHASH_MAX_BLOCK_BYTES) {
    throw new ApiError(
      'INVALID_REQUEST',
      `block size out of allowed range: ${BLKHASH_MIN_BLOCK_BYTES}-${BLKHASH_MAX_BLOCK_BYTES}`,
    );
  }
  if (size % BLOCK_ALIGNMENT_BYTES) {
    throw new ApiError('INVALID_REQUEST', `block size is not aligned to ${BLOCK_ALIGNMENT_BYTES}`);
  }
  return { algorithm: name as BlkhashAlgorithm, blockSize: size };
}

/** True when [start, end) lies wholly in zero extents (`extents` ordered and covering). */
function allZero(extents: readonly Extent[], from: { i: number }, start: number, end: number): boolean {
  while (from.i < extents.length && extents[from.i].start + extents[from.i].length <= start) from.i++;
  for (let i = from.i; i < extents.length && extents[i].start < end; i++) {
    if (!extents[i].zero) return false;
  }
  return true;
}

/** The image's blkhash: `{algorithm, block_size, checksum}` as imageio answers it. */
export async function blkhashImage(
  image: BlockImage,
  extents: readonly Extent[],
  params: BlkhashParams,
  signal?: AbortSignal,
): Promise<{ algorithm: string; block_size: number; checksum: string }> {
  const { algorithm, blockSize } = params;
  const outer = hasher(algorithm);
  const zeroDigests = new Map<number, Uint8Array>();
  const zeroDigest = (length: number): Uint8Array => {
    let d = zeroDigests.get(length);
    if (!d) {
      const h = hasher(algorithm);
      h.update(Buffer.alloc(length));
      d = h.digest();
      zeroDigests.set(length, d);
    }
    return d;
  };
  const buf = Buffer.allocUnsafe(blockSize);
  const cursor = { i: 0 };
  let lastYield = performance.now();
  for (let start = 0; start < image.virtualSize; start += blockSize) {
    signal?.throwIfAborted();
    const length = Math.min(blockSize, image.virtualSize - start);
    if (allZero(extents, cursor, start, start + length)) {
      outer.update(zeroDigest(length));
    } else {
      const block = await image.readInto(buf.subarray(0, length), start);
      const h = hasher(algorithm);
      h.update(block);
      outer.update(h.digest());
    }
    if (performance.now() - lastYield >= YIELD_INTERVAL_MS) {
      await yieldToEventLoop();
      lastYield = performance.now();
    }
  }
  return { algorithm, block_size: blockSize, checksum: Buffer.from(outer.digest()).toString('hex') };
}

export type BlkhashResult = Awaited<ReturnType<typeof blkhashImage>>;

/** The blkhash of a VDI's current content. */
export async function blkhashVdi(
  vdis: VdiStore,
  vdiId: string,
  params: BlkhashParams,
): Promise<BlkhashResult> {
  const lease = await vdis.images.lease(vdiId);
  try {
    return await blkhashImage(lease.image, await lease.extents(), params);
  } finally {
    lease.release();
  }
}

/** The blkhash of a raw file of `size` bytes (a staged upload). */
export async function blkhashRawFile(
  path: string,
  size: number,
  params: BlkhashParams,
): Promise<BlkhashResult> {
  const image = await RawFileImage.open(path, { virtualSize: size });
  try {
    return await blkhashImage(image, await image.extents(), params);
  } finally {
    await image.close();
  }
}
