/**
 * Free space on the file systems that hold images, and the reserve kept there
 * for diskport's own metadata.
 *
 * Why a reserve: the metadata store (SQLite) writes to the disk that the
 * images fill. Once an upload has taken the last block, recording its failure,
 * failing its task, creating a VDI or even starting up again fails too
 * (SQLITE_FULL), and the service is wedged. So data writes into a directory
 * registered here are refused (507 INSUFFICIENT_SPACE) when they would leave
 * less than its reserve free; the metadata's own writes never are.
 *
 * Asking the file system (statfs) at every write would cost a syscall per
 * write, and a conversion of scattered clusters makes many small ones; a
 * guard asks when the budget it last learned is spent, or after
 * SPACE_RECHECK_INTERVAL_MS or RECHECK_BYTES (others write to the same disk:
 * that bounds what it can take from the reserve unawares), and counts what is
 * claimed in between. Writes in flight are counted until they end, so several
 * writers of one process never promise each other the same blocks.
 */
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { ApiError } from '../errors.js';

/** How long a learned budget is trusted while writes go on (others may write to the same disk). */
export const SPACE_RECHECK_INTERVAL_MS = 250;
/** How many bytes are claimed on a learned budget before the file system is asked again. */
const RECHECK_BYTES = 64 * 1024 * 1024;

/** Bytes the file system at `dir` gives to an unprivileged writer. */
export async function freeBytes(dir: string): Promise<number> {
  const s = await fsp.statfs(dir);
  return s.bavail * s.bsize;
}

/** `12 MiB`, `1.5 GiB`: a size a person reads at a glance, to a tenth (details carry the exact bytes). */
export function humanBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = n;
  let i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? v : Number(v.toFixed(1))} ${units[i]}`;
}

/** 507: the storage repository cannot take `needed` more bytes. */
export function insufficientSpace(
  what: string,
  space: { needed: number; free: number | null; reserve: number },
): ApiError {
  const free =
    space.free === null
      ? `${what} ran out of space`
      : `${what} needs ${humanBytes(space.needed)} more, and it has ${humanBytes(Math.max(0, space.free))} free, ` +
        `of which ${humanBytes(space.reserve)} is kept for diskport's metadata`;
  return new ApiError(
    'INSUFFICIENT_SPACE',
    `not enough space in the storage repository: ${free}; free space in the SR (or import into a larger one), then try again`,
    { needed_bytes: space.needed, free_bytes: space.free, reserve_bytes: space.reserve },
  );
}

/** True for the errors of a full file system (ENOSPC, EDQUOT, SQLite's SQLITE_FULL) and for its 507. */
export function isOutOfSpace(err: unknown): boolean {
  const code = (err as { code?: unknown })?.code;
  return code === 'ENOSPC' || code === 'EDQUOT' || code === 'SQLITE_FULL' || code === 'INSUFFICIENT_SPACE';
}

/** A full file system's errno (or SQLITE_FULL) as the 507 a client reads; anything else as it was. */
export function spaceError(err: unknown, what = 'the operation', needed = 0): unknown {
  if (!isOutOfSpace(err) || err instanceof ApiError) return err;
  return insufficientSpace(what, { needed, free: null, reserve: reserveFor(null) });
}

/** Refuses the data writes into one directory that would eat into its reserve. */
export class SpaceGuard {
  private budget = 0;
  private claimedSince = 0;
  private learnedAt = Number.NEGATIVE_INFINITY;
  private inFlight = 0;
  private lastFree = 0;

  constructor(
    readonly dir: string,
    readonly reserveBytes: number,
  ) {}

  /**
   * Takes `bytes` from the budget before they are written, or throws the
   * 507; `release(bytes)` once the write has ended, whatever its outcome.
   */
  async claim(bytes: number, what = 'this write'): Promise<void> {
    if (this.claimNow(bytes)) return;
    await this.learn();
    if (bytes > this.budget) {
      throw insufficientSpace(what, { needed: bytes, free: this.lastFree, reserve: this.reserveBytes });
    }
    this.budget -= bytes;
    this.claimedSince += bytes;
    this.inFlight += bytes;
  }

  /**
   * Takes `bytes` from the budget at once when what was learned still holds
   * and covers them (claim's usual case, without a promise); false otherwise,
   * nothing taken: `claim` then asks the file system.
   */
  claimNow(bytes: number): boolean {
    if (
      bytes > this.budget ||
      this.claimedSince + bytes > RECHECK_BYTES ||
      Date.now() - this.learnedAt > SPACE_RECHECK_INTERVAL_MS
    ) {
      return false;
    }
    this.budget -= bytes;
    this.claimedSince += bytes;
    this.inFlight += bytes;
    return true;
  }

  release(bytes: number): void {
    this.inFlight -= bytes;
  }

  /** Throws the 507 unless `bytes` more fit above the reserve now (a declared upload, before its first byte). */
  async ensure(bytes: number, what: string): Promise<void> {
    await this.learn();
    if (bytes > this.budget) {
      throw insufficientSpace(what, { needed: bytes, free: this.lastFree, reserve: this.reserveBytes });
    }
  }

  private async learn(): Promise<void> {
    this.lastFree = await freeBytes(this.dir);
    // Writes in flight are not in the file system's count yet.
    this.budget = this.lastFree - this.reserveBytes - this.inFlight;
    this.claimedSince = 0;
    this.learnedAt = Date.now();
  }
}

/** Runs `write` of `bytes` once `guard` (if any) allows it. */
export function guarded<T>(
  guard: SpaceGuard | null | undefined,
  bytes: number,
  write: () => Promise<T>,
): Promise<T> {
  if (!guard) return write();
  // The usual case, claimed at once: one promise fewer per small write.
  if (guard.claimNow(bytes)) return write().finally(() => guard.release(bytes));
  return guardedSlowly(guard, bytes, write);
}

async function guardedSlowly<T>(guard: SpaceGuard, bytes: number, write: () => Promise<T>): Promise<T> {
  await guard.claim(bytes);
  try {
    return await write();
  } finally {
    guard.release(bytes);
  }
}

/** Guards by directory (absolute, no trailing separator). */
const guards = new Map<string, SpaceGuard>();

/** From now on, data writes under `dir` keep `reserveBytes` free. Returns its guard. */
export function guardSpace(dir: string, reserveBytes: number): SpaceGuard {
  const guard = new SpaceGuard(path.resolve(dir), reserveBytes);
  guards.set(guard.dir, guard);
  return guard;
}

/** The guard of the registered directory that holds `file`, if any (the deepest one). */
export function spaceGuardOf(file: string): SpaceGuard | null {
  let dir = path.dirname(path.resolve(file));
  for (;;) {
    const guard = guards.get(dir);
    if (guard) return guard;
    const parent = path.dirname(dir);
    if (parent === dir) return null;
    dir = parent;
  }
}

function reserveFor(file: string | null): number {
  return (file && spaceGuardOf(file)?.reserveBytes) || 0;
}
