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
  };
}

export interface TaskFilter {
  status?: string;
  vdi?: string;
  type?: string;
}

export class TaskStore {
  constructor(private readonly db: Db) {}

  insert(t: Task, stagingPath: string | null = null): void {
    this.db
      .prepare(
        `INSERT INTO tasks (id, type, status, progress, bytes_done, bytes_total, vdi_id, created_at, started_at,
           finished_at, error, result, staging_path)
         VALUES (@id, @type, @status, @progress, @bytes_done, @bytes_total, @vdi, @created_at, @started_at,
           @finished_at, @error, @result, @staging_path)`,
      )
      .run({
        ...t,
        error: t.error ? JSON.stringify(t.error) : null,
        result: t.result ? JSON.stringify(t.result) : null,
        staging_path: stagingPath,
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

  update(t: Task): void {
    this.db
      .prepare(
        `UPDATE tasks SET status=@status, progress=@progress, bytes_done=@bytes_done, bytes_total=@bytes_total,
           started_at=@started_at, finished_at=@finished_at, error=@error, result=@result WHERE id=@id`,
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
      });
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
   * After a restart nothing is running: every task left pending or running is
   * failed as INTERRUPTED, except those in `keep`. Returns the staging files
   * the failed ones held, for cleanup.
   */
  failInterrupted(finishedAt: string, keep: ReadonlySet<string> = new Set()): string[] {
    return this.db.transaction(() => {
      const rows = (
        this.db.prepare(`SELECT id, staging_path FROM tasks WHERE status IN ('pending','running')`).all() as {
          id: string;
          staging_path: string | null;
        }[]
      ).filter((r) => !keep.has(r.id));
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
