/**
 * Finalize: checks that every byte of an upload arrived, verifies the
 * checksum, then validates, converts and commits in one step that a crash
 * either completes or undoes (a restart runs it again from the staged bytes).
 */
import { promises as fsp } from 'node:fs';
import { ApiError } from '../errors.js';
import { nowIso } from '../storage/db.js';
import type { Snapshots } from '../storage/snapshots.js';
import type { VdiStore } from '../storage/vdis.js';
import type { TaskManager } from '../tasks/task-manager.js';
import type { Task } from '../tasks/task-store.js';
import type { ActiveUploads } from './active-upload.js';
import { commitStaged, commitWrites } from './commit.js';
import { assertBase } from './delta-import.js';
import type { SessionLifecycle } from './session-lifecycle.js';
import type { Live, SessionRegistry } from './session-registry.js';
import { verifyChecksum } from './upload-rules.js';

export class Finalizer {
  constructor(
    private readonly sessions: SessionRegistry,
    private readonly vdis: VdiStore,
    private readonly tasks: TaskManager,
    private readonly uploads: ActiveUploads,
    private readonly lifecycle: SessionLifecycle,
    private readonly snapshots?: Snapshots,
  ) {}

  /** Starts the commit of a complete upload; resolves with the task once started (see `completion`). */
  finalize(id: string): Task {
    const live = this.sessions.active(id, 'upload');
    if (live.finalizing) return { ...live.task.record };
    const t = live.t;
    if (t.size === null) {
      throw new ApiError(
        'SIZE_UNKNOWN',
        'the upload length is not known yet: send a chunk with Content-Range bytes a-b/total, or declare size',
      );
    }
    if (live.writers > 0) {
      throw new ApiError(
        'TRANSFER_BUSY',
        `${live.writers} chunk upload(s) still running; finalize when they have finished`,
      );
    }
    // An in-place upload's unwritten ranges keep the VDI's content: nothing is missing.
    const missing = t.in_place ? [] : live.ranges.missing(0, t.size);
    if (missing.length) {
      const bytes = missing.reduce((n, [s, e]) => n + e - s, 0);
      throw new ApiError(
        'TRANSFER_INCOMPLETE',
        `${bytes} of ${t.size} bytes have not arrived (first gap at ${missing[0][0]}); send them, then finalize`,
        { missing: missing.slice(0, 16), missing_bytes: bytes },
      );
    }
    t.state = 'finalizing';
    this.sessions.store.save(t);
    live.finalizing = this.run(live);
    return { ...live.task.record };
  }

  /** Resolves when the session's finalize ends (success or failure). */
  async completion(id: string): Promise<Task> {
    const live = this.sessions.find(id);
    if (live?.finalizing) return live.finalizing;
    return this.tasks.get(this.sessions.get(id).task_id);
  }

  async run(live: Live): Promise<Task> {
    const { t, task } = live;
    try {
      live.openHandle = null;
      await (await live.handle)?.close();
      live.handle = null;
      const staged = t.staging_path!;
      const vdi = this.vdis.get(t.vdi_id);
      if (t.format !== 'raw') await fsp.truncate(staged, t.size!);
      if (t.checksum) {
        const fileSize = t.format === 'raw' ? vdi.virtual_size : t.size!;
        await verifyChecksum(staged, fileSize, t.size!, t.checksum, task.signal);
      }
      if (t.base) await assertBase(this.vdis, vdi, t.base);
      const streaming = await this.uploads.streamingOf(live, vdi);
      const result = (generation: number) => ({
        vdi: vdi.id,
        format: t.format,
        generation,
        bytes_received: live.ranges.size(),
        ...(streaming && { bytes_streamed: streaming.streamedBytes }),
        ...(t.base && { base: t.base }),
        ...(t.snapshot_after_commit && { snapshot: t.snapshot_id }),
        transfer: t.id,
      });
      // The content switch, the session's state and the task's outcome commit
      // together: a crash cannot leave a committed VDI with a failed task.
      const inTransaction = (generation: number) => {
        // In the commit's transaction: the snapshot holds exactly what this
        // upload committed, or the commit does not happen.
        if (t.snapshot_after_commit) t.snapshot_id = this.snapshotOf(vdi.id, t.id);
        t.state = 'committed';
        this.sessions.store.save(t);
        if (t.snapshot_id) this.sessions.store.setSnapshot(t.id, t.snapshot_id);
        this.tasks.persist({
          ...task.record,
          status: 'success',
          progress: 1,
          finished_at: nowIso(),
          result: result(generation),
        });
      };
      const committed = t.in_place
        ? await commitWrites(this.vdis, vdi, staged, live.ranges.toJSON(), task, inTransaction)
        : await commitStaged(
            this.vdis,
            vdi,
            staged,
            t.format,
            task,
            streaming,
            live.rawDigests ?? null,
            inTransaction,
            { differencing: t.base !== null || live.layDifferencing === true },
          );
      const cleaned = this.lifecycle.cleanup(live);
      const done = task.succeed(result(committed.generation));
      await cleaned;
      return done;
    } catch (err) {
      const failed = await this.lifecycle.end(live, 'failed', err);
      return failed ?? task.record;
    }
  }

  /** A snapshot of the VDI as the running transaction leaves it (snapshotAll links and records synchronously). */
  private snapshotOf(vdiId: string, transferId: string): string {
    if (!this.snapshots) throw new Error('snapshot_after_commit needs the snapshot service');
    return this.snapshots.snapshotAll(
      [vdiId],
      { name_label: `after transfer ${transferId}` },
      ([snap]) => snap.id,
    );
  }
}
