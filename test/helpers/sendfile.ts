/** What the sendfile tests (raw, and vhd/qcow2 formats) share: their disk and the metric that tells the path a body took. */

import { api } from './api.js';
import { sample, scrape } from './metrics.js';
import { seededBytes } from './random.js';
import { waitFor } from './wait.js';

const MiB = 1024 * 1024;
export const SENDFILE_DISK_SIZE = 48 * MiB;

/**
 * A disk with data, holes and edges off every block and cluster boundary:
 * 0-8 MiB data, 8-20 hole, 20-20.5 data, 31.3-48 data.
 */
export function sendfileDisk(seed: number): Buffer {
  const buf = Buffer.alloc(SENDFILE_DISK_SIZE);
  seededBytes(8 * MiB, seed).copy(buf, 0);
  seededBytes(MiB / 2, seed + 1).copy(buf, 20 * MiB);
  const tail = 31 * MiB + 333_333;
  seededBytes(SENDFILE_DISK_SIZE - tail, seed + 2).copy(buf, tail);
  return buf;
}

/** Bytes the server at `base` has sent with sendfile so far (diskport_sendfile_bytes_total). */
export async function sentWithSendfile(base: string): Promise<number> {
  return sample(await scrape(base), 'diskport_sendfile_bytes_total') ?? 0;
}

/** A task as the sendfile tests poll it. */
export interface SendTask {
  id: string;
  status: string;
  bytes_done: number;
  error?: { code: string };
}

const exportTasks = async (base: string, query: string) =>
  (await api<SendTask[]>(base, 'GET', `/v1/tasks?type=export&${query}`)).body;

/** The export task running on `base` (the one a GET under test started). */
export function runningExport(base: string): Promise<SendTask> {
  return waitFor('the export task', async () => (await exportTasks(base, 'status=running'))[0]);
}

/** The newest export task on `base`, once it has ended. */
export function lastExportEnded(base: string): Promise<SendTask> {
  return waitFor('the export task to end', async () => {
    const x = (await exportTasks(base, 'limit=1'))[0];
    return x && x.status !== 'running' ? x : undefined;
  });
}

/** Task `id` on `base`, once it has ended. */
export function taskEnded(base: string, id: string): Promise<SendTask> {
  return waitFor('the task to end', async () => {
    const x = (await api<SendTask>(base, 'GET', `/v1/tasks/${id}`)).body;
    return x.status !== 'running' ? x : undefined;
  });
}

/** The bytes_done at which export task `id` stops growing: its client reads nothing. */
export function stalledSend(base: string, id: string): Promise<number> {
  let last = -1;
  return waitFor(
    'the send to stall',
    async () => {
      const done = (await api<SendTask>(base, 'GET', `/v1/tasks/${id}`)).body.bytes_done;
      const still = done === last;
      last = done;
      return still ? done : 0;
    },
    { intervalMs: 300 },
  );
}
