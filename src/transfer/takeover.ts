/**
 * Several nodes over one database: the work of a node that died (kill -9,
 * its machine gone) is taken over by a live node at that node's first
 * heartbeat after the dead one's --node-timeout. Its upload and download
 * sessions resume here (requests for them are forwarded here from then on,
 * src/http/session-forwarding.ts), a finalize it was running runs again from
 * the staged bytes, its pulls, pushes and set migrations go on from what the
 * other end holds, and merges are planned again; what cannot resume (a
 * one-shot PUT, a whole export) fails as INTERRUPTED, as after a restart.
 * Two nodes taking over at once split the tasks: each is claimed by one
 * UPDATE (TaskStore.claim).
 */
import { promises as fsp } from 'node:fs';
import type { MergeService } from '../ops/merges.js';
import type { Nodes } from '../storage/nodes.js';
import type { MigrationJournal } from './migration-journal.js';
import { resumePulls } from './pull.js';
import { resumePushes } from './push.js';
import { type IncrementalPushDeps, resumeIncrementalPushes } from './push-incremental.js';
import type { SetMigrations } from './set-migration.js';
import type { Transfer } from './transfer-store.js';

/** What resumes a node's transfer jobs: the services, as far as these need them. */
export interface TransferJobDeps extends IncrementalPushDeps {
  setMigrations: Pick<SetMigrations, 'resume'>;
}

export interface TakeoverDeps extends TransferJobDeps {
  nodes: Nodes;
  merges: Pick<MergeService, 'schedule'>;
}

/**
 * The pulls, pushes and set migrations whose sessions this node holds go on
 * by themselves: at startup all of them, after a take-over only those of the
 * tasks taken (`only`).
 */
export async function resumeTransferJobs(
  s: TransferJobDeps,
  only?: (taskId: string) => boolean,
): Promise<void> {
  const mine = (t: Transfer) => !only || only(t.task_id);
  await resumePulls(s, mine);
  const incremental = await resumeIncrementalPushes(s, only && mine);
  await resumePushes(s, (t) => incremental.has(t.id), mine);
  await s.setMigrations.resume(only);
}

export class Takeover {
  private running = false;

  constructor(
    private readonly s: TakeoverDeps,
    private readonly journal: MigrationJournal,
  ) {}

  /** At each heartbeat: takes over what dead nodes left running, one round at a time. */
  check(): void {
    if (this.running) return;
    this.running = true;
    void this.run()
      .catch((err) => this.s.logger.error({ err }, "could not take over a dead node's work"))
      .finally(() => {
        this.running = false;
      });
  }

  /** Returns the ids of the tasks taken. */
  async run(): Promise<string[]> {
    const { nodes, tasks, transfers, logger } = this.s;
    const dead = nodes.deadIds();
    if (!dead.size) return [];
    const taken = new Set(tasks.claim(dead));
    if (!taken.size) return [];
    const mine = (taskId: string) => taken.has(taskId);
    const keep = transfers.activeAtStartup(mine);
    const staging = tasks.recoverTaken(taken, new Set([...keep.tasks, ...this.journal.taskIds()]));
    await Promise.all(staging.map((file) => fsp.rm(file, { force: true })));
    transfers.takeOver(mine);
    await resumeTransferJobs(this.s, mine);
    this.s.merges.schedule();
    logger.info({ taken: [...taken], sessions: keep.tasks.size }, "took over a dead node's tasks");
    return [...taken];
  }
}
