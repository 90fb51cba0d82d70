/**
 * Checksums of a VDI's virtual disk: the hash of its bytes from 0 to
 * virtual_size, so the value is the same whatever format it was imported in
 * or is stored in (it equals `sha256sum` of the raw image).
 *
 * Holes are hashed from the shared zero buffer, never read; data is read in
 * HASH_CHUNK_BYTES pieces, the next read in flight while the current chunk is
 * hashed. Hashing zeros still costs CPU (sha256 runs at roughly 0.5-2 GiB/s
 * per core), so the cost follows the virtual size, and reads add the data.
 * Large disks therefore run as a task (type `checksum`, progress = bytes
 * hashed / virtual size). Results are cached per (VDI, generation,
 * algorithm): a generation names one content forever.
 */
import { createHash } from 'node:crypto';
import { setImmediate as yieldToEventLoop } from 'node:timers/promises';
import { LRUCache } from 'lru-cache';
import { ApiError, toApiError } from '../errors.js';
import { allocatedBytes, type BlockImage, type Extent } from '../image/block-image.js';
import { readVirtual } from '../image/read-virtual.js';
import { ZEROS } from '../image/zero.js';
import type { ImageLease } from '../storage/image-cache.js';
import type { Vdi, VdiStore } from '../storage/vdis.js';
import type { RunningTask, TaskManager } from '../tasks/task-manager.js';
import type { Task } from '../tasks/task-store.js';

export const CHECKSUM_ALGORITHMS = ['sha256', 'sha1', 'md5'] as const;
export type ChecksumAlgorithm = (typeof CHECKSUM_ALGORITHMS)[number];
export const DEFAULT_CHECKSUM_ALGORITHM: ChecksumAlgorithm = 'sha256';

/** More allocated data than this and the checksum runs as a task (reads dominate). */
export const ASYNC_DATA_THRESHOLD_BYTES = 1024 ** 3;
/** A larger virtual size than this runs as a task too: holes cost no reads, but hashing them is not free. */
export const ASYNC_VIRTUAL_SIZE_THRESHOLD_BYTES = 16 * 1024 ** 3;
/** The size of the shared zero buffer, so holes are hashed without allocating. */
export const HASH_CHUNK_BYTES = ZEROS.length;
/** Hashing is synchronous: give other requests a turn at least this often. */
const YIELD_INTERVAL_MS = 20;
const CACHE_ENTRIES = 4096;

export interface ChecksumResult {
  algorithm: ChecksumAlgorithm;
  /** Lowercase hex. */
  checksum: string;
  virtual_size: number;
  generation: number;
}

export type ChecksumOutcome =
  | { kind: 'done'; result: ChecksumResult; cached: boolean }
  | { kind: 'task'; task: Task };

export function parseAlgorithm(value: unknown): ChecksumAlgorithm {
  if (value === undefined || value === '') return DEFAULT_CHECKSUM_ALGORITHM;
  const name = typeof value === 'string' ? value.toLowerCase() : String(value);
  if (!(CHECKSUM_ALGORITHMS as readonly string[]).includes(name)) {
    throw new ApiError(
      'UNSUPPORTED_CHECKSUM_ALGORITHM',
      `unknown checksum algorithm '${String(value)}'; use one of: ${CHECKSUM_ALGORITHMS.join(', ')}`,
      { algorithm: String(value), supported: [...CHECKSUM_ALGORITHMS] },
    );
  }
  return name as ChecksumAlgorithm;
}

export interface HashProgress {
  signal?: AbortSignal;
  onBytes?: (n: number) => void;
}

/** Hex digest of the image's virtual bytes, given its extents. */
export async function hashImage(
  image: BlockImage,
  extents: readonly Extent[],
  algorithm: ChecksumAlgorithm,
  progress: HashProgress = {},
): Promise<string> {
  const hash = createHash(algorithm);
  let lastYield = performance.now();
  const chunks = readVirtual(image, extents, 0, image.virtualSize, HASH_CHUNK_BYTES);
  // readVirtual keeps the next read in flight while this chunk is hashed.
  for await (const chunk of chunks) {
    progress.signal?.throwIfAborted();
    hash.update(chunk);
    progress.onBytes?.(chunk.length);
    if (performance.now() - lastYield >= YIELD_INTERVAL_MS) {
      await yieldToEventLoop();
      lastYield = performance.now();
    }
  }
  progress.signal?.throwIfAborted();
  return hash.digest('hex');
}

export class ChecksumService {
  private readonly cache = new LRUCache<string, ChecksumResult>({ max: CACHE_ENTRIES });
  /** Checksum tasks still running, so a second request for the same content joins the first. */
  private readonly running = new Map<string, RunningTask>();
  /** Aborted by stop(): the service is closing and its task store with it. */
  private readonly stopping = new AbortController();

  constructor(
    private readonly vdis: VdiStore,
    private readonly tasks: TaskManager,
  ) {}

  /** Ends the running checksum tasks without recording them (the service is closing). */
  stop(): void {
    this.stopping.abort();
  }

  /**
   * The checksum of the VDI's current content: from the cache, computed
   * inline when small, or as a task when large. `async` forces one or the
   * other; a cached value is always answered at once.
   */
  async checksum(
    vdiId: string,
    algorithm: ChecksumAlgorithm,
    opts: { async?: boolean } = {},
  ): Promise<ChecksumOutcome> {
    const current = this.vdis.get(vdiId);
    const hit = this.cache.get(cacheKey(current, algorithm));
    if (hit) return { kind: 'done', result: hit, cached: true };

    const lease = await this.vdis.images.lease(vdiId);
    const { vdi, image } = lease;
    const key = cacheKey(vdi, algorithm);
    let handedToTask = false;
    try {
      const joined = this.running.get(key);
      if (joined) return { kind: 'task', task: this.tasks.get(joined.id) };
      const extents = await lease.extents();
      const runAsync =
        opts.async ??
        (allocatedBytes(extents) > ASYNC_DATA_THRESHOLD_BYTES ||
          image.virtualSize > ASYNC_VIRTUAL_SIZE_THRESHOLD_BYTES);
      if (!runAsync) {
        const result = toResult(vdi, image, algorithm, await hashImage(image, extents, algorithm));
        this.cache.set(key, result);
        return { kind: 'done', result, cached: false };
      }
      const task = this.tasks.start('checksum', vdi.id, { bytesTotal: image.virtualSize });
      this.running.set(key, task);
      handedToTask = true;
      this.runTask(task, key, lease, extents, algorithm).catch(() => {
        // Only if the store closed under the task: restart recovery records it as interrupted.
      });
      return { kind: 'task', task: { ...task.record } };
    } finally {
      if (!handedToTask) lease.release();
    }
  }

  private async runTask(
    task: RunningTask,
    key: string,
    lease: ImageLease,
    extents: readonly Extent[],
    algorithm: ChecksumAlgorithm,
  ): Promise<void> {
    const { vdi, image } = lease;
    try {
      const checksum = await hashImage(image, extents, algorithm, {
        signal: AbortSignal.any([task.signal, this.stopping.signal]),
        onBytes: (n) => task.addBytes(n),
      });
      const result = toResult(vdi, image, algorithm, checksum);
      this.cache.set(key, result);
      task.succeed({ ...result });
    } catch (err) {
      // Stopped with the service, as in a crash: restart recovery records the task as interrupted.
      if (!this.stopping.signal.aborted) task.fail(toApiError(err));
    } finally {
      this.running.delete(key);
      lease.release();
    }
  }
}

function cacheKey(vdi: Vdi, algorithm: ChecksumAlgorithm): string {
  return `${vdi.id}/${vdi.generation}/${algorithm}`;
}

function toResult(
  vdi: Vdi,
  image: BlockImage,
  algorithm: ChecksumAlgorithm,
  checksum: string,
): ChecksumResult {
  return { algorithm, checksum, virtual_size: image.virtualSize, generation: vdi.generation };
}
