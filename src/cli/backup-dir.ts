/**
 * A backup directory: the chain of qcow2 files `diskport backup` writes, and
 * `diskport-backup.json`, which says what they are. The first file is a full
 * export of a snapshot, named `{snapshot}.qcow2`; each later one is a qcow2
 * overlay of the changes since the previous run's snapshot, named after its
 * own and naming the previous file as its backing file, so `qemu-img`
 * follows the chain from the newest file.
 *
 * The manifest also holds the run in progress (`pending`): its snapshot and
 * how far its file is durably written, with the ETag that must still match,
 * so a run that was killed is continued by the next one. It is replaced by
 * rename after an fsync, so a crash leaves the old one or the new one. A
 * lock file keeps two runs from writing the same directory at once.
 */
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export const MANIFEST = 'diskport-backup.json';
const LOCK = '.diskport-backup.lock';
const KIND = 'diskport-backup';
const VERSION = 1;

/** One file of the chain. */
export interface Layer {
  /** The snapshot this file holds the disk of; the file is `{snapshot}.qcow2`. */
  snapshot: string;
  file: string;
  /** The snapshot of the file under it (its backing file), or null for a full export. */
  base: string | null;
  snapshot_time: string | null;
  /** Size of the file. */
  bytes: number;
  /** sha256 of the virtual disk at this snapshot, as the server computed it. */
  sha256: string;
  completed_at: string;
  /** The snapshot was deleted on the server, as the runs after it no longer need it as a base. */
  snapshot_deleted?: boolean;
}

/** The run in progress, as far as it got. */
export interface PendingRun {
  /** Names the run's snapshot (`name_label`), so one taken just before a kill is found again. */
  run: string;
  base: string | null;
  snapshot?: string;
  snapshot_time?: string | null;
  /** Set once the file has bytes: what must still match for them to be continued. */
  etag?: string;
  total?: number;
  /** Every byte before this offset of `{snapshot}.qcow2.part` is written (or a hole there), synced. */
  written?: number;
  /** The part file's `dev:ino`: a file put in its place since is not continued. */
  file_id?: string;
}

export interface Manifest {
  kind: typeof KIND;
  version: number;
  /** The server's base URL and the VDI the chain is of. */
  server: string;
  vdi: string;
  virtual_size: number;
  layers: Layer[];
  pending?: PendingRun;
}

/** Something about the directory that makes it unusable, said so the user can act on it. */
export class BackupDirError extends Error {}

export function newManifest(server: string, vdi: string, virtualSize: number): Manifest {
  return { kind: KIND, version: VERSION, server, vdi, virtual_size: virtualSize, layers: [] };
}

/**
 * The directory's manifest; undefined for a directory that does not exist
 * or is empty (a first backup). Anything else without a manifest is not a
 * backup directory, and is refused rather than written into.
 */
export async function loadManifest(dir: string): Promise<Manifest | undefined> {
  let text: string;
  try {
    text = await fsp.readFile(path.join(dir, MANIFEST), 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOTDIR') throw new BackupDirError(`${dir} is not a directory`);
    if (code !== 'ENOENT') throw err;
    const entries = await fsp.readdir(dir).catch((e: NodeJS.ErrnoException) => {
      if (e.code === 'ENOENT') return [];
      throw e;
    });
    if (entries.filter((e) => e !== LOCK).length) {
      throw new BackupDirError(
        `${dir} is not a diskport backup (it has no ${MANIFEST}) and is not empty; give a new or empty directory`,
      );
    }
    return undefined;
  }
  let m: Manifest;
  try {
    m = JSON.parse(text) as Manifest;
  } catch {
    throw new BackupDirError(
      `${path.join(dir, MANIFEST)} is not valid JSON: the backup's manifest is damaged`,
    );
  }
  if (m?.kind !== KIND || !Array.isArray(m.layers) || typeof m.vdi !== 'string') {
    throw new BackupDirError(`${path.join(dir, MANIFEST)} is not a diskport backup manifest`);
  }
  if (m.version > VERSION) {
    throw new BackupDirError(
      `${dir} was written by a newer diskport (backup format ${m.version}); use that version`,
    );
  }
  return m;
}

/** Writes the manifest durably: a crash leaves the old one or this one. */
export async function saveManifest(dir: string, m: Manifest): Promise<void> {
  const file = path.join(dir, MANIFEST);
  const tmp = `${file}.${process.pid}.tmp`;
  const h = await fsp.open(tmp, 'w', 0o644);
  try {
    await h.writeFile(`${JSON.stringify(m, null, 2)}\n`);
    await h.sync();
  } finally {
    await h.close();
  }
  await fsp.rename(tmp, file);
  await syncDir(dir);
}

export async function syncDir(dir: string): Promise<void> {
  const d = await fsp.open(dir, 'r');
  try {
    await d.sync();
  } finally {
    await d.close();
  }
}

/**
 * Takes the directory for this run; a lock left by a run that is still
 * alive on this host is refused, one left by a dead run is taken over.
 */
export async function lockDir(dir: string): Promise<() => Promise<void>> {
  const file = path.join(dir, LOCK);
  const me = JSON.stringify({ pid: process.pid, host: os.hostname() });
  for (let attempt = 0; ; attempt++) {
    try {
      await fsp.writeFile(file, me, { flag: 'wx' });
      return () => fsp.rm(file, { force: true });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST' || attempt > 0) throw err;
    }
    const holder = await fsp
      .readFile(file, 'utf8')
      .then((t) => JSON.parse(t) as { pid?: number; host?: string })
      .catch(() => ({}) as { pid?: number; host?: string });
    if (holder.host === os.hostname() && typeof holder.pid === 'number' && isRunning(holder.pid)) {
      throw new BackupDirError(
        `another diskport run (pid ${holder.pid}) is using ${dir}; let it finish, or stop it first`,
      );
    }
    await fsp.rm(file, { force: true });
  }
}

function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** The layers from the newest full export at or before `upTo` (the newest when undefined) to `upTo`. */
export function chainTo(m: Manifest, upTo?: string): Layer[] {
  const end = upTo === undefined ? m.layers.length - 1 : m.layers.findIndex((l) => l.snapshot === upTo);
  if (end < 0) {
    throw new BackupDirError(
      upTo === undefined
        ? 'the backup holds no completed run yet; run diskport backup first'
        : `the backup holds no run of snapshot ${upTo}; its runs are ${m.layers.map((l) => l.snapshot).join(', ')}`,
    );
  }
  let start = end;
  while (start > 0 && m.layers[start].base !== null) start--;
  if (m.layers[start].base !== null) {
    throw new BackupDirError(`the chain to ${m.layers[end].snapshot} has no full export under it`);
  }
  return m.layers.slice(start, end + 1);
}
