/**
 * One writer per VDI. In memory on purpose: a lock's holder is an operation
 * of this process, and a restart ends every operation (see task recovery).
 */
import { ApiError } from '../errors.js';

export class VdiLocks {
  private readonly holders = new Map<string, string>();

  /** Takes the VDI for `holder` (a task id) or throws 409 VDI_BUSY; returns the release function. */
  acquire(vdi: string, holder: string): () => void {
    const current = this.holders.get(vdi);
    if (current) {
      throw new ApiError(
        'VDI_BUSY',
        `VDI ${vdi} is busy with another operation (${current}); wait for it to finish or cancel it`,
        { vdi, holder: current },
      );
    }
    this.holders.set(vdi, holder);
    return () => {
      if (this.holders.get(vdi) === holder) this.holders.delete(vdi);
    };
  }

  assertFree(vdi: string): void {
    this.acquire(vdi, 'check')();
  }
}
