/** Wires the layers together: one set of services per data directory. */
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import type { Config } from './config.js';
import { type Metrics, observeTasks } from './metrics.js';
import { ChecksumService } from './ops/checksum.js';
import { type Db, openDb } from './storage/db.js';
import { SrStore } from './storage/srs.js';
import { VdiLocks } from './storage/vdi-locks.js';
import { VdiStore } from './storage/vdis.js';
import { TaskManager } from './tasks/task-manager.js';
import { TaskStore } from './tasks/task-store.js';
import { ImportService } from './transfer/import.js';

export interface Services {
  config: Config;
  logger: Logger;
  db: Db;
  srs: SrStore;
  vdis: VdiStore;
  tasks: TaskManager;
  imports: ImportService;
  checksums: ChecksumService;
  metrics: Metrics;
  close(): Promise<void>;
}

export async function createServices(config: Config, logger: Logger): Promise<Services> {
  await fsp.mkdir(config.dataDir, { recursive: true });
  const db = openDb(path.join(config.dataDir, 'diskport.sqlite'));
  const srs = new SrStore(db);
  await srs.ensureDefault(config.dataDir);
  const vdis = new VdiStore(db, srs, new VdiLocks());
  const tasks = new TaskManager(new TaskStore(db));

  // Restart recovery: whatever was running died with the previous process.
  const interrupted = tasks.recover();
  const removed = await vdis.collectGarbage();
  if (interrupted.length || removed.length) {
    logger.info({ interrupted: interrupted.length, removed }, 'recovered from an unclean stop');
  }

  const observed = observeTasks(tasks);

  return {
    config,
    logger,
    db,
    srs,
    vdis,
    tasks,
    imports: new ImportService(vdis, tasks),
    checksums: new ChecksumService(vdis, tasks),
    metrics: observed.metrics,
    async close() {
      tasks.cancelAll('the service is shutting down');
      observed.stop();
      db.close();
    },
  };
}
