/**
 * Prometheus metrics (GET /metrics), in a registry of their own per service
 * instance. Everything is derived from tasks, so nothing in the transfer
 * paths knows about metrics: a finished task counts its outcome and
 * duration, the running transfers are counted at scrape time, and so are
 * the bytes they have moved so far (import: received, export: sent), so a
 * transfer of several hours shows its rate while it runs, not all at its end.
 */
import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from 'prom-client';
import { WIRE_FORMATS } from './formats/types.js';
import type { RunningTask, TaskManager } from './tasks/task-manager.js';
import type { ReadCounters } from './transfer/export.js';

/** What the commits of imports read (storage/vdis.ts counts it). */
export interface CommitCounters {
  readonly deltaBaseBytesRead: number;
}

/** Which byte counter a task type moves; the types listed are transfers. */
export const TRANSFER_DIRECTIONS: Readonly<Record<string, 'received' | 'sent'>> = {
  import: 'received',
  export: 'sent',
};

/** From sub-second range reads to multi-hour imports of large disks. */
const DURATION_BUCKETS_SECONDS = [0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600];

export class Metrics {
  readonly registry = new Registry();
  readonly bytesReceived = new Counter({
    name: 'diskport_bytes_received_total',
    help: 'Bytes received by imports, by wire format (counted as they arrive)',
    labelNames: ['format'] as const,
    registers: [this.registry],
  });
  readonly bytesSent = new Counter({
    name: 'diskport_bytes_sent_total',
    help: 'Bytes sent by exports, by wire format (counted as they leave)',
    labelNames: ['format'] as const,
    registers: [this.registry],
  });
  readonly tasksTotal = new Counter({
    name: 'diskport_tasks_total',
    help: 'Finished tasks, by type and final status',
    labelNames: ['type', 'status'] as const,
    registers: [this.registry],
  });
  readonly taskDuration = new Histogram({
    name: 'diskport_task_duration_seconds',
    help: 'Time from start to end of finished tasks, by type',
    labelNames: ['type'] as const,
    buckets: DURATION_BUCKETS_SECONDS,
    registers: [this.registry],
  });
  readonly readRequests: Counter<'format'>;
  readonly readBytes: Counter<'format'>;
  readonly sendfileBytes: Counter;
  readonly activeTransfers: Gauge;
  /** Per running transfer, how much of its bytes_done the byte counters already hold. */
  private readonly counted = new Map<string, number>();

  /** Per format, how much of the ranged reads' bytes bytesSent already holds. */
  private readonly readBytesCounted = new Map<string, number>();

  constructor(
    private readonly tasks: TaskManager,
    private readonly reads: ReadCounters,
    commits: CommitCounters = { deltaBaseBytesRead: 0 },
  ) {
    // Ranged reads are not tasks; their counters are read at scrape time.
    const fromTotals = (totals: Map<string, number>) =>
      function (this: Counter<'format'>) {
        this.reset();
        for (const format of WIRE_FORMATS) this.labels(format).inc(totals.get(format) ?? 0);
      };
    this.readRequests = new Counter({
      name: 'diskport_read_requests_total',
      help: 'Ranged reads of exports (parts of a disk, not tasks), by wire format',
      labelNames: ['format'] as const,
      registers: [this.registry],
      collect: fromTotals(reads.requests),
    });
    this.readBytes = new Counter({
      name: 'diskport_read_bytes_total',
      help: 'Bytes sent by ranged reads of exports, by wire format',
      labelNames: ['format'] as const,
      registers: [this.registry],
      collect: fromTotals(reads.bytes),
    });
    this.sendfileBytes = new Counter({
      name: 'diskport_sendfile_bytes_total',
      help: 'Bytes of exports sent with sendfile (the disk from its files, no copy through the service; vhd and qcow2 with their format bytes between); part of bytes_sent',
      registers: [this.registry],
      collect() {
        this.reset();
        this.inc(reads.sendfileBytes);
      },
    });
    this.activeTransfers = new Gauge({
      name: 'diskport_active_transfers',
      help: 'Imports and exports running now',
      registers: [this.registry],
      collect() {
        const running = tasks.list({ status: 'running' });
        this.set(running.filter((t) => t.type in TRANSFER_DIRECTIONS).length);
      },
    });
    new Counter({
      name: 'diskport_delta_base_bytes_read_total',
      help: 'Bytes imports read of the VDI content they were laid onto, to tell what changed (after a snapshot: a delta, its partial blocks only; a whole image, none where the content has block digests)',
      registers: [this.registry],
      collect() {
        this.reset();
        this.inc(commits.deltaBaseBytesRead);
      },
    });
    collectDefaultMetrics({ register: this.registry });
    // Known formats start at 0, so a rate() has a baseline before the first transfer.
    for (const format of WIRE_FORMATS) {
      this.bytesReceived.labels(format).inc(0);
      this.bytesSent.labels(format).inc(0);
    }
  }

  /** Brings the byte counters up to date with the transfers running now (before a scrape). */
  countRunning(): void {
    for (const task of this.tasks.running()) this.countBytes(task);
    // Ranged reads send bytes too, without a task: bytes_sent counts them as well.
    for (const [format, total] of this.reads.bytes) {
      const before = this.readBytesCounted.get(format) ?? 0;
      if (total > before) this.bytesSent.labels(format).inc(total - before);
      this.readBytesCounted.set(format, total);
    }
  }

  /** Accounts for one finished task. */
  recordFinished(task: RunningTask): void {
    const record = task.record;
    this.tasksTotal.labels(record.type, record.status).inc();
    const startedAt = Date.parse(record.started_at ?? record.created_at);
    const finishedAt = Date.parse(record.finished_at ?? '');
    if (Number.isFinite(startedAt) && Number.isFinite(finishedAt)) {
      this.taskDuration.labels(record.type).observe(Math.max(0, finishedAt - startedAt) / 1000);
    }
    this.countBytes(task);
    this.counted.delete(record.id);
  }

  /** Adds what a transfer has moved since it was last counted (in this process). */
  private countBytes(task: RunningTask): void {
    const direction = TRANSFER_DIRECTIONS[task.record.type];
    if (!direction) return;
    const done = task.bytesMoved;
    const before = this.counted.get(task.record.id) ?? task.bytesBefore;
    this.counted.set(task.record.id, done);
    // bytes_done can go back (a pull whose source changed starts over, a failed write's bytes
    // are dropped): what comes again is moved again, and counts from there.
    if (done <= before) return;
    const format = task.format ?? 'unknown';
    (direction === 'received' ? this.bytesReceived : this.bytesSent).labels(format).inc(done - before);
  }

  async render(): Promise<{ contentType: string; body: string }> {
    this.countRunning();
    return { contentType: this.registry.contentType, body: await this.registry.metrics() };
  }
}

/** Creates the metrics of one service and feeds them every finished task; returns them and the unsubscribe. */
export function observeTasks(
  tasks: TaskManager,
  reads: ReadCounters,
  commits?: CommitCounters,
): { metrics: Metrics; stop: () => void } {
  const metrics = new Metrics(tasks, reads, commits);
  const stop = tasks.onFinished((task) => {
    try {
      metrics.recordFinished(task);
    } catch {
      // Metrics must never fail the operation that finished.
    }
  });
  return { metrics, stop };
}
