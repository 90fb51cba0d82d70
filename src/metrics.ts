/**
 * Prometheus metrics (GET /metrics), in a registry of their own per service
 * instance. Everything is derived from tasks, so nothing in the transfer
 * paths knows about metrics: a finished task counts its outcome, duration
 * and bytes (import: received, export: sent), and the running transfers are
 * counted at scrape time.
 */
import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from 'prom-client';
import { WIRE_FORMATS } from './formats/types.js';
import type { TaskManager } from './tasks/task-manager.js';
import type { Task } from './tasks/task-store.js';

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
    help: 'Bytes received by finished imports, by wire format',
    labelNames: ['format'] as const,
    registers: [this.registry],
  });
  readonly bytesSent = new Counter({
    name: 'diskport_bytes_sent_total',
    help: 'Bytes sent by finished exports, by wire format',
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
  readonly activeTransfers: Gauge;

  constructor(tasks: TaskManager) {
    this.activeTransfers = new Gauge({
      name: 'diskport_active_transfers',
      help: 'Imports and exports running now',
      registers: [this.registry],
      collect() {
        const running = tasks.list({ status: 'running' });
        this.set(running.filter((t) => t.type in TRANSFER_DIRECTIONS).length);
      },
    });
    collectDefaultMetrics({ register: this.registry });
    // Known formats start at 0, so a rate() has a baseline before the first transfer.
    for (const format of WIRE_FORMATS) {
      this.bytesReceived.labels(format).inc(0);
      this.bytesSent.labels(format).inc(0);
    }
  }

  /** Accounts for one finished task. */
  recordFinished(task: Task): void {
    this.tasksTotal.labels(task.type, task.status).inc();
    const startedAt = Date.parse(task.started_at ?? task.created_at);
    const finishedAt = Date.parse(task.finished_at ?? '');
    if (Number.isFinite(startedAt) && Number.isFinite(finishedAt)) {
      this.taskDuration.labels(task.type).observe(Math.max(0, finishedAt - startedAt) / 1000);
    }
    const direction = TRANSFER_DIRECTIONS[task.type];
    if (!direction || task.bytes_done <= 0) return;
    // A task's format is only recorded in its result, which a failed task does not have.
    const format = typeof task.result?.format === 'string' ? task.result.format : 'unknown';
    (direction === 'received' ? this.bytesReceived : this.bytesSent).labels(format).inc(task.bytes_done);
  }

  async render(): Promise<{ contentType: string; body: string }> {
    return { contentType: this.registry.contentType, body: await this.registry.metrics() };
  }
}

/** Creates the metrics of one service and feeds them every finished task; returns them and the unsubscribe. */
export function observeTasks(tasks: TaskManager): { metrics: Metrics; stop: () => void } {
  const metrics = new Metrics(tasks);
  const stop = tasks.onFinished((task) => {
    try {
      metrics.recordFinished(task);
    } catch {
      // Metrics must never fail the operation that finished.
    }
  });
  return { metrics, stop };
}
