/**
 * Merges run in the background, one at a time, each as a task (`type:
 * merge`: progress in bytes, cancellable, its outcome kept). Planned again
 * after every delete and commit and at startup, so a merge a restart cut
 * short is run again from its start (storage/merges.ts says why that is
 * safe). A merge that gave way to a commit runs again after it; one that
 * was cancelled or failed is not tried again until the next start.
 *
 * Several nodes over one database plan the same merges from the same rows:
 * one node at a time merges, the one holding the `merges` lease
 * (storage/leases.ts); a node that finds it held plans again a while later.
 */
import type { Logger } from 'pino';
import { ApiError } from '../errors.js';
import { MergePreempted } from '../storage/chain-gate.js';
import type { ChainMerges, MergePlan } from '../storage/merges.js';
import type { TaskManager } from '../tasks/task-manager.js';

export const MERGE_TASK_TYPE = 'merge';

/** How long a node whose merges wait for another node's turn waits before planning again. */
const TURN_RETRY_MS = 5_000;

/**
 * The cluster's one merging node: when this node may merge now, how to give
 * the turn back and the fence its switches check; null when another node merges.
 */
export type MergeTurn = () => { release(): void; fence(): void } | null;

const ALONE = { release() {}, fence() {} };

export class MergeService {
  private running: Promise<void> | null = null;
  private again = false;
  private stopped = false;
  /** Merges not to try again in this process (cancelled, or failed). */
  private readonly skipped = new Set<string>();
  private current: { cancel(): void } | null = null;

  constructor(
    private readonly merges: ChainMerges,
    private readonly tasks: TaskManager,
    private readonly maxDepth: number,
    private readonly logger?: Logger,
    private readonly turn: MergeTurn = () => ALONE,
  ) {}

  /** Plans and runs whatever merges the chains need now (returns at once). */
  schedule(): void {
    if (this.stopped) return;
    if (this.running) {
      this.again = true;
      return;
    }
    this.running = this.loop()
      // What failed is the metadata store itself (PostgreSQL away, recording the task's
      // end too): logged, and planned again at the next commit, delete or start.
      .catch((err) => this.logger?.error({ err }, 'merges stopped'))
      .finally(() => {
        this.running = null;
      });
  }

  /** Resolves when no merge is running or planned (for shutdown and tests). */
  async idle(): Promise<void> {
    while (this.running) await this.running;
  }

  /** Stops the merge running now (it runs again at the next start) and plans no more. */
  async stop(): Promise<void> {
    this.stopped = true;
    this.current?.cancel();
    await this.idle();
  }

  private async loop(): Promise<void> {
    const turn = this.turn();
    if (!turn) {
      setTimeout(() => this.schedule(), TURN_RETRY_MS).unref();
      return;
    }
    try {
      await this.mergeAll(turn.fence);
    } finally {
      turn.release();
    }
  }

  private async mergeAll(fence: () => void): Promise<void> {
    do {
      this.again = false;
      for (;;) {
        if (this.stopped) return;
        let plan: MergePlan | undefined;
        try {
          plan = this.merges.plan(this.maxDepth).find((p) => !this.skipped.has(keyOf(p)));
        } catch (err) {
          this.logger?.error({ err }, 'could not plan merges');
          return;
        }
        if (!plan) break;
        await this.runOne(plan, fence);
      }
    } while (this.again && !this.stopped);
  }

  private async runOne(plan: MergePlan, fence: () => void): Promise<void> {
    const task = this.tasks.start(MERGE_TASK_TYPE, plan.vdi, { bytesTotal: plan.bytes });
    this.current = {
      cancel: () => task.requestCancel('diskport is stopping; the merge runs again at the next start'),
    };
    try {
      const outcome = await this.merges.run(plan, {
        signal: task.signal,
        onBytes: (n) => task.addBytes(n),
        fence,
      });
      const from = plan.kind === 'down' ? plan.child : plan.parent;
      const into = plan.kind === 'down' ? plan.parent : plan.layer;
      task.succeed({ kind: plan.kind, outcome, merged: from, into });
    } catch (err) {
      const reason = task.signal.reason ?? err;
      // The database away is no reason to give the merge up: it is planned again later.
      if (!(reason instanceof MergePreempted) && !unavailable(err)) this.skipped.add(keyOf(plan));
      if (!(err instanceof ApiError) && !task.signal.aborted) {
        this.logger?.error({ err, task: task.id, plan }, 'merge failed');
      }
      task.fail(reason instanceof MergePreempted ? reason : err);
    } finally {
      this.current = null;
    }
  }
}

function unavailable(err: unknown): boolean {
  return err instanceof ApiError && err.code === 'METADATA_UNAVAILABLE';
}

function keyOf(plan: MergePlan): string {
  return plan.kind === 'down' ? `down:${plan.child}>${plan.parent}` : `flatten:${plan.layer}>${plan.parent}`;
}
