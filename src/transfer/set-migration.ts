/**
 * Migrating a disk set to another diskport (xapi's `VM.migrate_send` with
 * its VDI→SR and VDI→format maps): `POST /v1/disk-sets/{id}/migrate {dest,
 * map, delete_source}`, `dest` being the destination's receive token
 * (migration-receive.ts).
 *
 * 1. Everything is checked before a byte moves (migration-plan.ts).
 * 2. One parent task (type `set-migrate`) and a child task per disk moved
 *    (type `migrate-disk`); the parent's result lists them from the start.
 * 3. The disks to copy are snapshotted together (one instant) and their
 *    data, sparse, written into new VDIs on the destination through write
 *    tickets (migration-copy.ts: only allocated ranges cross; each round
 *    commits atomically there). Then rounds of changed blocks: a new
 *    consistent snapshot, the blocks changed since the previous one sent,
 *    until a round's delta is small (SMALL_DELTA_BYTES) or MAX_ROUNDS are
 *    done; the last snapshot is the final one, and the destination holds
 *    exactly it.
 * 4. `blank` disks get an empty VDI of the same size, `skip` disks nothing.
 * 5. The destination migration commits only when every disk has; a failure
 *    or a cancel aborts it (the destination deletes every VDI it made) and
 *    removes the snapshots taken here, so the source is as it was.
 *    `delete_source` deletes the moved VDIs (and those snapshots) only after
 *    the destination committed.
 * 6. Resumable: where it stands is journaled at every step
 *    (migration-journal.ts), and a restart of this side goes on from there
 *    (`resume`); the destination says what its tickets hold, so nothing it
 *    has is sent again. A destination that restarts is waited for (retries
 *    with backoff, migration-destination.ts).
 */

import type { Logger } from 'pino';
import { ApiError, type CancelledError } from '../errors.js';
import { CHANGED_BLOCK_BYTES, changedBlocks } from '../ops/changed-blocks.js';
import { openSecret, sealSecret } from '../secrets.js';
import type { DiskSets } from '../storage/disk-sets.js';
import type { Snapshots } from '../storage/snapshots.js';
import type { VdiStore } from '../storage/vdis.js';
import type { RunningTask, TaskManager } from '../tasks/task-manager.js';
import type { Task } from '../tasks/task-store.js';
import { FetchGuard, pinnedAgent } from './fetch-guard.js';
import { type Ranges, sendRound } from './migration-copy.js';
import { Destination } from './migration-destination.js';
import type { DiskProgress, MigrationJournal, MigrationProgress } from './migration-journal.js';
import { planMigration, type SetMigrateRequest } from './migration-plan.js';
import { decodeReceiveToken, encodeReceiveToken, type ReceiveToken } from './migration-receive.js';

export type { DiskMapEntry, DiskMode, MigrationProblem, SetMigrateRequest } from './migration-plan.js';

/** A round that sent no more than this ends the rounds: the next snapshot would be about as small. */
export const SMALL_DELTA_BYTES = 64 * 1024 * 1024;
/** Incremental rounds after the full copy, at most (the last is the final snapshot). */
export const MAX_ROUNDS = 4;

export interface SetMigrationDeps {
  vdis: VdiStore;
  snapshots: Snapshots;
  diskSets: DiskSets;
  tasks: TaskManager;
  journal: MigrationJournal;
  allowFetch: readonly string[];
  /** The service's token seals the receive token kept for a resume (secrets.ts). */
  token?: string;
  logger: Logger;
}

/** A migration this process runs: its tasks, its destination, where it stands. */
interface Run {
  parent: RunningTask;
  children: Map<string, RunningTask>;
  token: ReceiveToken;
  dest: Destination;
  p: MigrationProgress;
  save(): void;
}

export class SetMigrations {
  constructor(private readonly s: SetMigrationDeps) {}

  /** Validates everything, then starts the migration; returns the parent task. */
  async start(setId: string, req: SetMigrateRequest): Promise<Task> {
    const { plans, token, dest } = await planMigration(this.s, setId, req);
    const moving = plans.filter((p) => p.mode !== 'skip');
    const total = moving.reduce((n, p) => n + p.dataBytes, 0);
    const parent = this.s.tasks.start('set-migrate', null, { bytesTotal: total });
    const children = new Map<string, RunningTask>();
    const disks: DiskProgress[] = plans.map((pl) => {
      const task =
        pl.mode === 'skip'
          ? null
          : this.s.tasks.start('migrate-disk', pl.vdi.id, { bytesTotal: pl.dataBytes });
      if (task) children.set(pl.vdi.id, task);
      return {
        vdi: pl.vdi.id,
        mode: pl.mode,
        sr: pl.sr,
        format: pl.format,
        data_bytes: pl.dataBytes,
        task: task?.id ?? null,
        dest_vdi: null,
        holds: null,
        full_bytes: null,
        sending: null,
      };
    });
    const p: MigrationProgress = {
      set: setId,
      delete_source: req.delete_source === true,
      disks,
      taken: [],
      round: 0,
      target: null,
      delta: 0,
      synced: false,
      committed: false,
    };
    const run = this.runOf(parent, children, token, dest, p);
    run.save();
    parent.setPartialResult(this.resultOf(run));
    void this.run(run);
    return this.s.tasks.get(parent.id);
  }

  /** Startup: the migrations a previous process left running go on where they stood. */
  async resume(only: (taskId: string) => boolean = () => true): Promise<void> {
    for (const { id, dest: sealed, progress: p } of this.s.journal.list()) {
      // Ended just before the restart (its row not removed yet): nothing to resume.
      const status = (() => {
        try {
          return this.s.tasks.get(id).status;
        } catch {
          return null;
        }
      })();
      if (status !== 'running') {
        this.s.journal.remove(id);
        continue;
      }
      // Another live node's migration: that node runs it.
      if (!this.s.tasks.owns(id) || !only(id)) continue;
      const parent = this.s.tasks.adopt(id);
      const children = new Map<string, RunningTask>();
      for (const d of p.disks) {
        if (d.task && this.s.tasks.get(d.task).status === 'running') {
          children.set(d.vdi, this.s.tasks.adopt(d.task));
        }
      }
      let token: ReceiveToken;
      let dest: Destination;
      try {
        token = decodeReceiveToken(openSecret(sealed, this.s.token));
        const target = await new FetchGuard(this.s.allowFetch).check(token.url, 'dest');
        dest = new Destination(token, pinnedAgent(target), this.s.logger);
      } catch (err) {
        // Nothing can reach the destination now: its token's expiry cleans up there.
        const e = new ApiError('INTERRUPTED', `the set migration cannot resume: ${(err as Error).message}`);
        await this.removeSnapshots(p.taken);
        for (const c of children.values()) c.fail(e);
        parent.fail(e);
        this.s.journal.remove(id);
        continue;
      }
      this.s.logger.info({ task: id }, 'resuming a set migration interrupted by a restart');
      void this.run(this.runOf(parent, children, token, dest, p));
    }
  }

  private runOf(
    parent: RunningTask,
    children: Map<string, RunningTask>,
    token: ReceiveToken,
    dest: Destination,
    p: MigrationProgress,
  ): Run {
    const raw = encodeReceiveToken(token);
    const sealed = this.s.token ? sealSecret(raw, this.s.token) : raw;
    return {
      parent,
      children,
      token,
      dest,
      p,
      save: () => this.s.journal.save(parent.id, sealed, p),
    };
  }

  private resultOf(r: Run, extra: Record<string, unknown> = {}) {
    return {
      disk_set: r.p.set,
      destination: r.token.url,
      migration: r.token.id,
      disks: r.p.disks.map((d) => ({
        vdi: d.vdi,
        mode: d.mode,
        task: d.task,
        sr: d.mode === 'skip' ? null : d.sr,
        image_format: d.mode === 'skip' ? null : d.format,
        dest_vdi: d.dest_vdi,
      })),
      ...extra,
    };
  }

  private async run(r: Run): Promise<void> {
    const { parent, dest, p } = r;
    const signal = parent.signal;
    const migration = r.token.id;
    const copies = p.disks.filter((d) => d.mode === 'copy');
    try {
      // The full copies done before a restart count as they did.
      for (const d of copies) if (d.full_bytes !== null) this.progress(r, d, d.full_bytes);
      await this.makeVdis(r);
      parent.setPartialResult(this.resultOf(r));

      // The full copy (round 0) from one consistent snapshot, then rounds of changed blocks.
      while (!p.synced) {
        const target = p.target ?? this.snapshot(copies, r);
        for (const d of copies) {
          const snap = target[d.vdi];
          if (d.holds === snap) continue;
          const ctx = {
            vdis: this.s.vdis,
            dest,
            parent,
            save: r.save,
            check: () => {
              parent.throwIfCancelled();
              r.children.get(d.vdi)?.throwIfCancelled();
            },
            progress: (bytes: number) => this.progress(r, d, bytes),
          };
          if (d.holds === null) {
            d.full_bytes = await sendRound(ctx, d, snap, await this.dataRanges(snap), true);
            r.save();
          } else {
            p.delta += await sendRound(ctx, d, snap, await this.changed(d, snap), false);
            r.save();
          }
        }
        if (p.round > 0 && (p.delta <= SMALL_DELTA_BYTES || p.round >= MAX_ROUNDS)) p.synced = true;
        else {
          p.round++;
          p.target = null;
          p.delta = 0;
        }
        r.save();
      }

      if (!p.committed) {
        parent.throwIfCancelled();
        await dest.retrying('the commit', signal, () => this.commit(dest, migration, signal));
        p.committed = true;
        r.save();
      }
      const rounds = p.round;
      for (const d of copies)
        r.children.get(d.vdi)?.succeed({ vdi: d.vdi, dest_vdi: d.dest_vdi, mode: 'copy', rounds });
      const target = p.target ?? {};
      const finals = copies.map((d) => ({ vdi: d.vdi, snapshot: target[d.vdi] }));
      // Only the final snapshots stay (they are what the destination holds), unless the sources go.
      const keep = new Set(p.delete_source ? [] : finals.map((f) => f.snapshot));
      await this.removeSnapshots(p.taken.filter((id) => !keep.has(id)));
      if (p.delete_source) {
        for (const d of p.disks) {
          if (d.mode === 'skip') continue;
          await this.s.vdis.delete(d.vdi).catch((err) => {
            if ((err as ApiError).code !== 'VDI_NOT_FOUND') throw err;
          });
        }
      }
      parent.succeed(
        this.resultOf(r, {
          rounds,
          final_snapshots: p.delete_source ? [] : finals,
          source_deleted: p.delete_source,
        }),
      );
      this.s.journal.remove(parent.id);
    } catch (err) {
      const e = signal.aborted ? (signal.reason as CancelledError) : err;
      if (!p.committed) {
        this.s.logger.warn({ err, task: parent.id }, 'set migration failed; aborting it on the destination');
        await dest.call('DELETE', `/v1/migrations/${migration}`, 'the abort').catch((abortErr) => {
          this.s.logger.error(
            { err: abortErr },
            "the destination's migration could not be aborted; its token's expiry will",
          );
        });
        await this.removeSnapshots(p.taken);
      }
      for (const c of r.children.values()) if (c.record.status === 'running') c.fail(e);
      parent.fail(e);
      this.s.journal.remove(parent.id);
    }
  }

  /**
   * Makes the VDIs on the destination, one after the other, each journaled
   * once made. The destination lists a migration's VDIs in the order they
   * were made, so one made just before a restart (its answer lost) is found
   * there rather than made twice.
   */
  private async makeVdis(r: Run): Promise<void> {
    const { dest, p, parent } = r;
    const signal = parent.signal;
    for (const d of p.disks) {
      if (d.mode === 'skip') continue;
      if (!d.dest_vdi) {
        parent.throwIfCancelled();
        const vdi = this.s.vdis.get(d.vdi);
        await dest.retrying(`the VDI for ${d.vdi}`, signal, async () => {
          const there = await dest.call<{ vdis: string[] }>(
            'GET',
            `/v1/migrations/${dest.token.id}`,
            'the migration',
            undefined,
            signal,
          );
          const claimed = new Set(p.disks.map((x) => x.dest_vdi));
          const made =
            there.vdis.find((v) => !claimed.has(v)) ??
            (
              await dest.call<{ id: string }>(
                'POST',
                `/v1/migrations/${dest.token.id}/vdis`,
                `the VDI for ${d.vdi}`,
                {
                  name_label: vdi.name_label,
                  name_description: vdi.name_description,
                  virtual_size: vdi.virtual_size,
                  sr: d.sr,
                  image_format: d.format,
                },
                signal,
              )
            ).id;
          d.dest_vdi = made;
        });
        r.save();
      }
      if (d.mode === 'blank') {
        r.children.get(d.vdi)?.succeed({ vdi: d.vdi, dest_vdi: d.dest_vdi, mode: 'blank' });
      }
    }
  }

  /** Commits the destination's migration; one that committed already (an answer lost) is done. */
  private async commit(dest: Destination, migration: string, signal: AbortSignal): Promise<void> {
    try {
      await dest.call('POST', `/v1/migrations/${migration}/commit`, 'the commit', {}, signal);
    } catch (err) {
      if (!(err instanceof ApiError && err.details?.code === 'MIGRATION_NOT_OPEN')) throw err;
      const there = await dest.call<{ state: string }>(
        'GET',
        `/v1/migrations/${migration}`,
        'the migration',
        undefined,
        signal,
      );
      if (there.state !== 'committed') throw err;
    }
  }

  /** Disk `d`'s full copy is at `bytes`: its task shows it, and the parent the sum of them. */
  private progress(r: Run, d: DiskProgress, bytes: number): void {
    r.children.get(d.vdi)?.setBytesDone(bytes);
    let sum = 0;
    for (const x of r.p.disks) {
      if (x.mode !== 'copy') continue;
      const c = r.children.get(x.vdi);
      sum += c ? c.record.bytes_done : (x.full_bytes ?? 0);
    }
    r.parent.setBytesDone(sum);
    // Recorded at once (each chunk is megabytes): a restart shows what was shown, never less.
    const child = r.children.get(d.vdi);
    if (child) this.s.tasks.persistProgress(child.record);
    this.s.tasks.persistProgress(r.parent.record);
  }

  /**
   * Snapshots of the copied disks at one instant, journaled as the round's
   * target in the same transaction that makes them: a kill right after
   * cannot leave snapshots the journal does not name (nothing would remove them).
   */
  private snapshot(copies: DiskProgress[], r: Run): Record<string, string> {
    const { p } = r;
    return this.s.snapshots.snapshotAll(
      copies.map((d) => d.vdi),
      { name_label: 'set migration', name_description: 'taken by a set migration; removed when it ends' },
      (made) => {
        p.taken.push(...made.map((v) => v.id));
        const target = Object.fromEntries(made.map((v) => [v.snapshot_of as string, v.id]));
        p.target = target;
        r.save();
        return target;
      },
    );
  }

  /** The data of a snapshot: its allocated, non-zero extents. */
  private async dataRanges(snap: string): Promise<Ranges> {
    const lease = await this.s.vdis.images.lease(snap);
    try {
      return (await lease.extents()).filter((e) => !e.zero).map((e) => [e.start, e.length]);
    } finally {
      lease.release();
    }
  }

  /** What changed between the snapshot the destination holds and `snap`. */
  private async changed(d: DiskProgress, snap: string): Promise<Ranges> {
    const { runs } = await changedBlocks(this.s.vdis, snap, d.holds as string);
    const size = this.s.vdis.get(snap).virtual_size;
    // Runs of 64 KiB block indices; the last block may end past the disk.
    return runs.map(([first, end]) => {
      const start = first * CHANGED_BLOCK_BYTES;
      return [start, Math.min(end * CHANGED_BLOCK_BYTES, size) - start];
    });
  }

  private async removeSnapshots(ids: string[]): Promise<void> {
    for (const id of ids) {
      await this.s.vdis.delete(id).catch((err) => {
        if ((err as ApiError).code !== 'VDI_NOT_FOUND') {
          this.s.logger.warn({ err, vdi: id }, 'a migration snapshot stays');
        }
      });
    }
  }
}
