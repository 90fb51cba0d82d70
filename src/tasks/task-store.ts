/** Task records in the metadata store: the persisted outcome of every long operation. */
import type { Db } from '../storage/db.js';
import { type Page, type PageRequest, selectPage } from '../storage/paging.js';

export type TaskStatus = 'pending' | 'running' | 'success' | 'failure' | 'cancelled';
export const FINISHED_STATUSES: readonly TaskStatus[] = ['success', 'failure', 'cancelled'];

export interface Task {
  id: string;
  type: string;
  status: TaskStatus;
  progress: number;
  bytes_done: number;
  bytes_total: number | null;
  vdi: string | null;
  created_at: string;
  started_at: string | null;
  finished_at: string | null;
  /** `status` is the HTTP status the failure would have had as an answer. */
  error: { code: string; message: string; status?: number } | null;
  result: Record<string, unknown> | null;
  /** The node running it (GET /v1/nodes); null where nodes were not recorded yet. */
  node?: string | null;
}

interface TaskRow {
  id: string;
  type: string;
  status: TaskStatus;
  progress: number;
  bytes_done: number;
  bytes_total: number | null;
  vdi_id: string | null;
  created_at: string;
  started_at: string | null;
  finished_at: string | null;
  error: string | null;
  result: string | null;
  staging_path: string | null;
  node_id?: string | null;
}

function fromRow(r: TaskRow): Task {
  return {
    id: r.id,
    type: r.type,
    status: r.status,
    progress: r.progress,
    bytes_done: r.bytes_done,
    bytes_total: r.bytes_total,
    vdi: r.vdi_id,
    created_at: r.created_at,
    started_at: r.started_at,
    finished_at: r.finished_at,
    error: r.error ? JSON.parse(r.error) : null,
    result: r.result ? JSON.parse(r.result) : null,
    node: r.node_id ?? null,
  };
}

export interface TaskFilter {
  status?: string;
  vdi?: string;
  type?: string;
}

export class TaskStore {
  /**
   * `nodeId`: the node running the tasks this store starts. A task row names
   * its node, and only that node may change it: a node presumed dead whose
   * tasks another took over changes nothing (its UPDATE matches no row).
   */
  constructor(
    private readonly db: Db,
    readonly nodeId: string | null = null,
  ) {}

  insert(t: Task, stagingPath: string | null = null): void {
    this.db
      .prepare(
        `INSERT INTO tasks (id, type, status, progress, bytes_done, bytes_total, vdi_id, created_at, started_at,
           finished_at, error, result, staging_path, node_id)
         VALUES (@id, @type, @status, @progress, @bytes_done, @bytes_total, @vdi, @created_at, @started_at,
           @finished_at, @error, @result, @staging_path, @node_id)`,
      )
      .run({
        ...t,
        error: t.error ? JSON.stringify(t.error) : null,
        result: t.result ? JSON.stringify(t.result) : null,
        staging_path: stagingPath,
        node_id: this.nodeId,
      });
  }

  /**
   * Records a running task's progress without waiting for the disk: the
   * commit is not fsynced (synchronous=NORMAL for this one statement; WAL
   * keeps it ordered before every later commit, which is fsynced). A power
   * cut may lose the last progress figures, never a state change. An fsync
   * of the WAL once a second, on the event loop, behind the gigabytes an
   * import is writing, stalled every transfer of the process for 100 ms
   * and more each time.
   */
  updateProgress(t: Task): void {
    this.db.relaxedDurability(() => this.update(t));
  }

  /** Returns false when the task is another node's now (taken over): nothing was written. */
  update(t: Task): boolean {
    return (
      this.db
        .prepare(
          `UPDATE tasks SET status=@status, progress=@progress, bytes_done=@bytes_done, bytes_total=@bytes_total,
           started_at=@started_at, finished_at=@finished_at, error=@error, result=@result
         WHERE id=@id AND (node_id IS NULL OR node_id = @node)`,
        )
        .run({
          id: t.id,
          status: t.status,
          progress: t.progress,
          bytes_done: t.bytes_done,
          bytes_total: t.bytes_total,
          started_at: t.started_at,
          finished_at: t.finished_at,
          error: t.error ? JSON.stringify(t.error) : null,
          result: t.result ? JSON.stringify(t.result) : null,
          node: this.nodeId,
        }).changes > 0
    );
  }

  /** The node running the task, if a node does. */
  nodeOf(id: string): string | null {
    const row = this.db.prepare('SELECT node_id FROM tasks WHERE id = ?').get(id) as
      | { node_id: string | null }
      | undefined;
    return row?.node_id ?? null;
  }

  /**
   * The unfinished tasks `claim(dead)` would take, read without writing: a
   * start on a full disk frees what those tasks do not keep before it writes.
   */
  claimable(dead: ReadonlySet<string>): Map<string, string | null> {
    const rows = this.db
      .prepare(
        `SELECT id, node_id FROM tasks WHERE status IN ('pending','running')
           AND (node_id IS NULL OR node_id IS NOT ?)`,
      )
      .all(this.nodeId) as { id: string; node_id: string | null }[];
    const known = new Set(
      (this.db.prepare('SELECT id FROM nodes').all() as { id: string }[]).map((r) => r.id),
    );
    return new Map(
      rows
        .filter((r) => r.node_id === null || dead.has(r.node_id) || !known.has(r.node_id))
        .map((r) => [r.id, r.node_id]),
    );
  }

  /**
   * Takes over the unfinished tasks of the nodes in `dead` (and of none):
   * each becomes this node's in one UPDATE, so two nodes scanning at once
   * never both take one. Returns the ids taken.
   */
  claim(dead: ReadonlySet<string>): string[] {
    return this.db.transaction(() => {
      const take = this.db.prepare(
        `UPDATE tasks SET node_id = @me WHERE id = @id AND status IN ('pending','running')
           AND node_id IS NOT DISTINCT FROM @was`,
      );
      return [...this.claimable(dead)]
        .filter(([id, was]) => take.run({ me: this.nodeId, id, was }).changes > 0)
        .map(([id]) => id);
    })();
  }

  /** This node's unfinished tasks. */
  ownedUnfinished(): Set<string> {
    const rows = this.db
      .prepare(
        `SELECT id FROM tasks WHERE status IN ('pending','running') AND node_id IS NOT DISTINCT FROM ?`,
      )
      .all(this.nodeId) as { id: string }[];
    return new Set(rows.map((r) => r.id));
  }

  get(id: string): Task | undefined {
    const row = this.db.prepare('SELECT * FROM tasks WHERE id = ?').get(id) as TaskRow | undefined;
    return row && fromRow(row);
  }

  list(filter: { status?: string; vdi?: string; limit?: number }): Task[] {
    const where: string[] = [];
    const params: Record<string, unknown> = { limit: filter.limit ?? 1000 };
    if (filter.status) {
      where.push('status = @status');
      params.status = filter.status;
    }
    if (filter.vdi) {
      where.push('vdi_id = @vdi');
      params.vdi = filter.vdi;
    }
    const sql = `SELECT * FROM tasks ${where.length ? `WHERE ${where.join(' AND ')}` : ''}
                 ORDER BY created_at DESC, seq DESC LIMIT @limit`;
    return (this.db.prepare(sql).all(params) as TaskRow[]).map(fromRow);
  }

  /** One page of tasks, newest first, filtered by status, VDI and type. */
  listPage(filter: TaskFilter, page: PageRequest): Page<Task> {
    const where: string[] = [];
    if (filter.status) where.push('status = @status');
    if (filter.vdi) where.push('vdi_id = @vdi');
    if (filter.type) where.push('type = @type');
    const rows = selectPage<TaskRow>(this.db, 'tasks', where, { ...filter }, page);
    return { ...rows, items: rows.items.map(fromRow) };
  }

  /**
   * Removes finished tasks that finished before `finishedBefore`, and the
   * oldest finished ones beyond `keepCount`. Pending and running tasks are
   * never removed, whatever their age. Returns how many went.
   */
  prune(finishedBefore: string, keepCount: number): number {
    return this.db.transaction(() => {
      const finished = `status IN ('success','failure','cancelled')`;
      const old = this.db
        .prepare(`DELETE FROM tasks WHERE ${finished} AND finished_at < ?`)
        .run(finishedBefore).changes;
      const beyond = this.db
        .prepare(
          `DELETE FROM tasks WHERE seq IN (
             SELECT seq FROM tasks WHERE ${finished} ORDER BY created_at DESC, seq DESC LIMIT -1 OFFSET ?)`,
        )
        .run(keepCount).changes;
      return old + beyond;
    })();
  }

  /**
   * After a restart nothing is running: every task of this node (claimed from
   * the dead ones) left pending or running is failed as INTERRUPTED, except
   * those in `keep`. Returns the staging files
   * the failed ones held, for cleanup.
   */
  failInterrupted(
    finishedAt: string,
    keep: ReadonlySet<string> = new Set(),
    /** Only these (the tasks just taken from a dead node, while this one runs its own). */
    only?: ReadonlySet<string>,
  ): string[] {
    return this.db.transaction(() => {
      const rows = (
        this.db
          .prepare(
            `SELECT id, staging_path FROM tasks WHERE status IN ('pending','running')
               AND node_id IS NOT DISTINCT FROM ?`,
          )
          .all(this.nodeId) as {
          id: string;
          staging_path: string | null;
        }[]
      ).filter((r) => !keep.has(r.id) && (!only || only.has(r.id)));
      const fail = this.db.prepare(
        `UPDATE tasks SET status='failure', finished_at=@finishedAt, error=@error WHERE id=@id`,
      );
      const error = JSON.stringify({
        code: 'INTERRUPTED',
        message: 'the service stopped while this task was running; start the operation again',
      });
      for (const r of rows) fail.run({ id: r.id, finishedAt, error });
      return rows.flatMap((r) => (r.staging_path ? [r.staging_path] : []));
    })();
  }
}
