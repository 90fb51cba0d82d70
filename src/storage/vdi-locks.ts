/**
 * One writer per VDI. In this process, a map of holders (a lock's holder is
 * an operation of this process, and a restart ends every operation: see
 * task recovery). With several nodes over one database (PostgreSQL), each
 * lock is also a lease in the database (storage/leases.ts), so VDI_BUSY
 * holds across nodes, a dead node's locks lapse with its heartbeat, and a
 * commit checks that its node still holds the VDI (assertHeld).
 */
import { ApiError } from '../errors.js';
import type { Leases } from './leases.js';

const resourceOf = (vdi: string) => `vdi:${vdi}`;

export class VdiLocks {
  private readonly holders = new Map<string, { holder: string; epoch: number }>();

  /** `leases`: the database's, when other nodes share it; none on SQLite (one process). */
  constructor(private readonly leases?: Leases) {}

  /** Takes the VDI for `holder` (a task id) or throws 409 VDI_BUSY; returns the release function. */
  acquire(vdi: string, holder: string): () => void {
    const current = this.holders.get(vdi);
    if (current) throw busy(vdi, current.holder);
    let epoch = 0;
    if (this.leases) {
      const taken = this.leases.take(resourceOf(vdi), holder);
      if (!taken.ok) throw busy(vdi, taken.current.holder, taken.current.node_id);
      epoch = taken.epoch;
    }
    const mine = { holder, epoch };
    this.holders.set(vdi, mine);
    return () => {
      if (this.holders.get(vdi) !== mine) return;
      this.holders.delete(vdi);
      try {
        this.leases?.release(resourceOf(vdi), epoch);
      } catch {
        // the store is away: the lease lapses (unrenewed past a failed heartbeat, or taken as this node's)
        this.unreleased.add(`${vdi}\0${epoch}`);
      }
    };
  }

  /** Releases that could not reach the store, tried again at each heartbeat. */
  private readonly unreleased = new Set<string>();

  /** Called at each heartbeat: retries releases the store missed. */
  retryReleases(): void {
    for (const key of this.unreleased) {
      const [vdi, epoch] = key.split('\0');
      this.leases?.release(resourceOf(vdi), Number(epoch));
      this.unreleased.delete(key);
    }
  }

  assertFree(vdi: string): void {
    const current = this.holders.get(vdi);
    if (current) throw busy(vdi, current.holder);
    const lease = this.leases?.holderOf(resourceOf(vdi));
    if (lease) throw busy(vdi, lease.holder, lease.node_id);
  }

  /**
   * Throws 409 VDI_LEASE_LOST when this process holds the VDI but its node's
   * lease on it lapsed: called in the transaction that commits the VDI's
   * content, so a node presumed dead commits nothing.
   */
  assertHeld(vdi: string): void {
    const current = this.holders.get(vdi);
    if (!current || !this.leases) return;
    this.leases.assertHeld(resourceOf(vdi), current.epoch, `VDI ${vdi}`);
  }
}

function busy(vdi: string, holder: string, node?: string): ApiError {
  const where = node ? ` on node ${node}` : '';
  return new ApiError(
    'VDI_BUSY',
    `VDI ${vdi} is busy with another operation (${holder}${where}); wait for it to finish or cancel it`,
    node ? { vdi, holder, node } : { vdi, holder },
  );
}
