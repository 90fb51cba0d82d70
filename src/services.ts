/** Wires the layers together: one set of services per data directory. */
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import type { Config } from './config.js';
import { PRIVATE_DIR_MODE } from './image/file-io.js';
import { isOutOfSpace } from './image/space.js';
import { type Metrics, observeTasks } from './metrics.js';
import { ChecksumService } from './ops/checksum.js';
import { MergeService } from './ops/merges.js';
import { VdiCopies } from './ops/vdi-copy.js';
import { lockDataDir } from './storage/data-dir-lock.js';
import { type Db, openDb } from './storage/db.js';
import { DiskSets } from './storage/disk-sets.js';
import { Leases } from './storage/leases.js';
import { ChainMerges } from './storage/merges.js';
import { Nodes } from './storage/nodes.js';
import { Snapshots } from './storage/snapshots.js';
import { SrStore } from './storage/srs.js';
import { VdiLocks } from './storage/vdi-locks.js';
import { MAX_VIRTUAL_SIZE_BYTES, VdiStore } from './storage/vdis.js';
import { TaskManager } from './tasks/task-manager.js';
import { TaskStore } from './tasks/task-store.js';
import { ReadCounters } from './transfer/export.js';
import { TicketService } from './transfer/imageio-tickets.js';
import { MigrationJournal } from './transfer/migration-journal.js';
import { MigrationReceiver } from './transfer/migration-receive.js';
import { TransferService } from './transfer/sessions.js';
import { SetMigrations } from './transfer/set-migration.js';
import { resumeTransferJobs, Takeover } from './transfer/takeover.js';

export interface Services {
  config: Config;
  logger: Logger;
  db: Db;
  srs: SrStore;
  vdis: VdiStore;
  snapshots: Snapshots;
  /** Disk sets and their consistent snapshots. */
  diskSets: DiskSets;
  /** Incoming set migrations (receive tokens). */
  migrationsIn: MigrationReceiver;
  /** Outgoing set migrations. */
  setMigrations: SetMigrations;
  /** Clones into another SR and migrations: copies run as tasks. */
  copies: VdiCopies;
  tasks: TaskManager;
  transfers: TransferService;
  /** ovirt-imageio tickets, each over a transfer session. */
  tickets: TicketService;
  checksums: ChecksumService;
  /** Ranged reads, which are counted rather than tasks. */
  reads: ReadCounters;
  /** Background merges of chains at rest. */
  merges: MergeService;
  metrics: Metrics;
  /** This node and the others sharing the metadata store. */
  nodes: Nodes;
  close(): Promise<void>;
}

export async function createServices(config: Config, logger: Logger): Promise<Services> {
  await fsp.mkdir(config.dataDir, { recursive: true, mode: PRIVATE_DIR_MODE });
  // On SQLite the data directory is this process's alone; on PostgreSQL nodes share it.
  const dirLock = config.databaseUrl ? null : lockDataDir(config.dataDir);
  try {
    return await openServices(config, logger, () => dirLock?.release());
  } catch (err) {
    // A start that failed lets go of the directory: the same process may start again on it.
    dirLock?.release();
    throw err;
  }
}

async function openServices(config: Config, logger: Logger, releaseDir: () => void): Promise<Services> {
  const db = openDb({ file: path.join(config.dataDir, 'diskport.sqlite'), databaseUrl: config.databaseUrl });
  const srs = new SrStore(db, { spaceReserveBytes: config.spaceReserveBytes });
  await srs.ensureDefault(config.dataDir, MAX_VIRTUAL_SIZE_BYTES);
  await srs.ensureConfigured(config.srs, MAX_VIRTUAL_SIZE_BYTES);
  let leases: Leases | undefined;
  let locks: VdiLocks | undefined;
  let takeover: Takeover | undefined;
  const nodes = new Nodes(db, {
    heartbeatMs: config.heartbeatMs,
    timeoutMs: config.nodeTimeoutMs,
    exclusive: !config.databaseUrl,
    onBeat: (now) => {
      leases?.renew(now);
      locks?.retryReleases();
      takeover?.check();
    },
    onStop: () => leases?.releaseAll(),
    onError: (err) => logger.error({ err }, "could not record this node's heartbeat"),
  });
  // Several nodes share a database: one writer per VDI is a lease there, lapsing with the heartbeat.
  leases = config.databaseUrl
    ? new Leases(db, nodes.id, config.nodeTimeoutMs, (id) => nodes.isDead(id))
    : undefined;
  locks = new VdiLocks(leases);
  const vdis = new VdiStore(db, srs, locks);
  const tasks = new TaskManager(new TaskStore(db, nodes.id), logger);

  // Restart recovery: whatever was running died with the previous process,
  // except resumable transfers, which pick up where they were. Files are
  // freed before anything is written (this node's row and claims included):
  // on a disk that an upload filled, its staging file is the space that
  // recording its end needs. This node's work is the unfinished tasks of dead
  // nodes (a previous process of this one included); what live nodes run
  // stays theirs.
  const dead = nodes.deadIds();
  const claimable = tasks.claimable(dead);
  const snapshots = new Snapshots(vdis, srs);
  const transfers = new TransferService(db, vdis, tasks, logger, snapshots);
  const keep = transfers.activeAtStartup((taskId) => claimable.has(taskId) || tasks.owns(taskId));
  // Set migrations resume too: their parent and disk tasks stay running.
  const journal = new MigrationJournal(db);
  // Files no row names may be a live node's, written before its commit: only a lone node collects them.
  const removed = nodes.othersAlive() ? [] : await vdis.collectGarbage(keep.staging);
  nodes.register();
  const claimed = tasks.claim(dead);
  const owns = (taskId: string) => tasks.owns(taskId);
  let interrupted: string[] = [];
  try {
    interrupted = tasks.recover(new Set([...keep.tasks, ...journal.taskIds()]));
  } catch (err) {
    // Still full (of what is not diskport's to free): serve anyway, and record it at the next start.
    if (!isOutOfSpace(err)) throw err;
    logger.error(
      { err },
      'the disk is full: tasks of the previous process stay marked running until a restart',
    );
  }
  transfers.resume(owns);
  if (interrupted.length || removed.length || claimed.length) {
    logger.info(
      { interrupted: interrupted.length, removed, taken: claimed.length },
      'recovered from an unclean stop',
    );
  }
  nodes.start();

  const stopPruning = tasks.startPruning(
    config.taskRetention,
    (n) => logger.info({ removed: n }, 'removed finished tasks past their retention'),
    (err) => logger.error({ err }, 'could not remove finished tasks past their retention'),
  );

  // Merges a restart cut short (or a lowered depth limit calls for) are planned again now.
  const mergeTurn = (lease: Leases) => () => {
    const taken = lease.take('merges', 'merges');
    if (!taken.ok) return null;
    return {
      release: () => lease.release('merges', taken.epoch),
      fence: () => lease.assertHeld('merges', taken.epoch, "the cluster's merge turn"),
    };
  };
  const merges = new MergeService(
    new ChainMerges(db, srs, vdis),
    tasks,
    config.maxChainDepth,
    logger,
    leases && mergeTurn(leases),
  );
  vdis.onChainsChanged = () => merges.schedule();
  merges.schedule();

  const tickets = new TicketService(db, transfers, vdis, tasks, logger);
  tickets.start();
  const migrationsIn = new MigrationReceiver(db, srs, vdis, tickets, logger);
  migrationsIn.start();
  const checksums = new ChecksumService(vdis, tasks);
  const reads = new ReadCounters();
  const observed = observeTasks(tasks, reads, vdis);
  const diskSets = new DiskSets(db, vdis, snapshots);

  const services: Services = {
    config,
    logger,
    db,
    srs,
    vdis,
    snapshots,
    diskSets,
    migrationsIn,
    setMigrations: new SetMigrations({
      vdis,
      snapshots,
      diskSets,
      tasks,
      journal,
      allowFetch: config.allowFetch,
      token: config.token,
      logger,
    }),
    copies: new VdiCopies(vdis, srs, tasks),
    tasks,
    transfers,
    tickets,
    checksums,
    reads,
    merges,
    metrics: observed.metrics,
    nodes,
    async close() {
      // Operations in flight end with the process, as in a crash: recovery
      // fails plain tasks as INTERRUPTED and resumes transfer sessions.
      stopPruning();
      await merges.stop();
      // Bytes written with flush=n are made durable now: a graceful stop loses none of them.
      await transfers.flushAll().catch(() => {});
      vdis.images.clear();
      migrationsIn.stop();
      tickets.stop();
      transfers.stop();
      checksums.stop();
      observed.stop();
      nodes.stop();
      db.close();
      releaseDir();
    },
  };
  // Pulls and pushes whose sessions survived a restart go on by themselves.
  await resumeTransferJobs(services);
  // A node that dies later: its work is taken over at a heartbeat of this one.
  takeover = new Takeover(services, journal);
  return services;
}
