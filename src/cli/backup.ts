/**
 * `diskport backup <vdi-url> <dir>`: one run adds one file to the chain in
 * `<dir>` (backup-dir.ts). The run snapshots the VDI, then downloads the
 * snapshot as qcow2: in full the first time (or when the chain cannot go
 * on: its last snapshot is gone from the server, or the server cannot say
 * what changed since), else only what changed since the previous run's
 * snapshot (`?format=qcow2&base=`), an overlay whose backing file is the
 * previous run's file. The new file is `{snapshot}.qcow2`, so `qemu-img
 * convert` of it gives the disk as it was at this run's snapshot.
 *
 * Resumable like `download`: the snapshot is named after the run before it
 * is taken, and the file's progress is checkpointed in the manifest, so a
 * run that was stopped or killed is continued by the next one on the same
 * snapshot, with `Range` + `If-Range` (a snapshot never changes, so its
 * ETag holds). Once the file is complete and renamed into place, the
 * snapshots of older runs are deleted on the server but the newest
 * `keepSnapshots` (the newest is the next run's base).
 */
import { randomUUID } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { HttpError, type RetryPolicy, withRetry } from '../transfer/retry-policy.js';
import { type Endpoint, send } from '../transfer/transfer-client.js';
import {
  BackupDirError,
  type Layer,
  loadManifest,
  lockDir,
  type Manifest,
  newManifest,
  type PendingRun,
  saveManifest,
  syncDir,
} from './backup-dir.js';
import { createProgress, formatBytes, type Progress } from './progress.js';
import { type AnnouncedPolicy, announcedRetries, Interrupted, interruptible } from './run.js';
import { SparseWriter } from './sparse-writer.js';
import { deleteVdi, findVdi, getVdi, sha256Of, snapshot, snapshotsOf, type VdiJson } from './vdi-api.js';

/** How much a killed run can lose: the file is synced and its position saved this often. */
const CHECKPOINT_BYTES = 64 * 1024 * 1024;
const CONTENT_RANGE = /^bytes (\d+)-(\d+)\/(\d+)$/;

export interface BackupOptions {
  vdi: string;
  dir: string;
  progress: boolean;
  retry: RetryPolicy;
  /** Snapshots of the newest runs kept on the server (at least 1: the next run's base). */
  keepSnapshots: number;
}

export interface BackupSummary {
  vdi: string;
  snapshot: string;
  file: string;
  kind: 'full' | 'delta';
  /** The snapshot the delta is against (its file is the backing file), or null. */
  base: string | null;
  bytes: number;
  bytes_received: number;
  /** Bytes an earlier, stopped run of this backup had written, not downloaded again. */
  bytes_resumed: number;
  sha256: string;
  layers: number;
  snapshots_deleted: string[];
  retries: number;
}

export async function backup(server: Endpoint, opts: BackupOptions): Promise<BackupSummary> {
  const interrupt = interruptible();
  try {
    return await runBackup({ ...server, signal: interrupt.signal }, interrupt.signal, opts);
  } catch (err) {
    throw interrupt.signal.aborted ? new Interrupted() : err;
  } finally {
    interrupt.dispose();
  }
}

async function runBackup(ep: Endpoint, signal: AbortSignal, opts: BackupOptions): Promise<BackupSummary> {
  const dir = path.resolve(opts.dir);
  let progress: Progress | undefined;
  const announced = announcedRetries(opts.retry, signal, () => progress);
  const retry = announced.policy;
  checkOwner(dir, await loadManifest(dir), opts.vdi);
  const vdi = await withRetry(retry, () => getVdi(ep, opts.vdi));
  if (vdi.is_snapshot) {
    throw new BackupDirError(
      `VDI ${vdi.id} is a snapshot; back up the VDI it is of (${vdi.snapshot_of ?? 'deleted'})`,
    );
  }
  await fsp.mkdir(dir, { recursive: true });
  const unlock = await lockDir(dir);
  try {
    // Read again under the lock: a run that just ended may have added a layer.
    const m = (await loadManifest(dir)) ?? newManifest(ep.base.href, vdi.id, vdi.virtual_size);
    checkOwner(dir, m, opts.vdi);
    m.server = ep.base.href;
    const pending = await startRun(ep, retry, dir, m);
    const snap = await takeSnapshot(ep, retry, dir, m, pending);
    if (snap.virtual_size !== m.virtual_size) {
      // A resized disk: a delta against a base of another size would not read as this disk.
      if (pending.base) process.stderr.write('diskport: the disk was resized; this run is a full export\n');
      pending.base = null;
      m.virtual_size = snap.virtual_size;
    }
    const got = await fetchLayer(ep, signal, retry, dir, m, pending, opts.progress, (p) => {
      progress = p;
    });
    progress?.stop();
    const sha256 = await withRetry(retry, () => sha256Of(ep, snap.id));
    const file = `${snap.id}.qcow2`;
    await fsp.rename(path.join(dir, `${file}.part`), path.join(dir, file));
    await syncDir(dir);
    const layer: Layer = {
      snapshot: snap.id,
      file,
      base: pending.base,
      snapshot_time: snap.snapshot_time,
      bytes: got.total,
      sha256,
      completed_at: new Date().toISOString(),
    };
    m.layers.push(layer);
    m.pending = undefined;
    await saveManifest(dir, m);
    const deleted = await retire(ep, dir, m, opts.keepSnapshots);
    return {
      vdi: vdi.id,
      snapshot: snap.id,
      file: path.join(dir, file),
      kind: layer.base ? 'delta' : 'full',
      base: layer.base,
      bytes: got.total,
      bytes_received: got.received,
      bytes_resumed: got.resumed,
      sha256,
      layers: m.layers.length,
      snapshots_deleted: deleted,
      retries: announced.count(),
    };
  } catch (err) {
    progress?.stop();
    throw err;
  } finally {
    await unlock();
  }
}

function checkOwner(dir: string, m: Manifest | undefined, vdi: string): void {
  if (m && m.vdi !== vdi) {
    throw new BackupDirError(`${dir} holds backups of VDI ${m.vdi}, not of ${vdi}; give another directory`);
  }
}

/** The run an earlier one left unfinished, or a new one against the newest layer still on the server. */
async function startRun(ep: Endpoint, retry: AnnouncedPolicy, dir: string, m: Manifest): Promise<PendingRun> {
  if (m.pending) {
    process.stderr.write(`diskport: continuing the backup run an earlier one left in ${dir}\n`);
    return m.pending;
  }
  const last = m.layers.at(-1);
  let base: string | null = null;
  if (last) {
    if (await withRetry(retry, () => findVdi(ep, last.snapshot))) base = last.snapshot;
    else {
      process.stderr.write(
        `diskport: snapshot ${last.snapshot} of the last backup is gone from the server; this run is a full export\n`,
      );
    }
  }
  m.pending = { run: randomUUID(), base };
  await saveManifest(dir, m);
  return m.pending;
}

/**
 * The run's snapshot: the one it already took, or the one named after it
 * (taken by a run killed before it could say so), or a new one. A lost
 * answer to the POST is looked for before posting again.
 */
async function takeSnapshot(
  ep: Endpoint,
  retry: AnnouncedPolicy,
  dir: string,
  m: Manifest,
  pending: PendingRun,
): Promise<VdiJson> {
  if (pending.snapshot) {
    const known = await withRetry(retry, () => findVdi(ep, pending.snapshot as string));
    if (known) return known;
    // Deleted under us: what was fetched of it is of no use.
    process.stderr.write(
      `diskport: snapshot ${pending.snapshot} of the stopped run is gone; taking another\n`,
    );
    Object.assign(pending, { snapshot: undefined, etag: undefined, total: undefined, written: undefined });
    pending.run = randomUUID();
  }
  const label = `diskport backup ${pending.run}`;
  const snap = await withRetry(retry, async () => {
    const taken = (await snapshotsOf(ep, m.vdi)).find((s) => s.name_label === label);
    return taken ?? (await snapshot(ep, m.vdi, label));
  });
  pending.snapshot = snap.id;
  pending.snapshot_time = snap.snapshot_time;
  await saveManifest(dir, m);
  return snap;
}

/**
 * Downloads the run's snapshot into `{snapshot}.qcow2.part`: the delta
 * against `pending.base`, or the whole disk. Continues where a stopped run
 * checkpointed, if the ETag still matches; a delta the server can no longer
 * make (its base gone, its history merged away) becomes a full export.
 */
async function fetchLayer(
  ep: Endpoint,
  signal: AbortSignal,
  retry: AnnouncedPolicy,
  dir: string,
  m: Manifest,
  pending: PendingRun,
  showProgress: boolean,
  onProgress: (p: Progress) => void,
): Promise<{ total: number; received: number; resumed: number }> {
  const snap = pending.snapshot as string;
  const partFile = path.join(dir, `${snap}.qcow2.part`);
  const { out, fileId, resumedFrom } = await openPart(partFile, pending);
  let progress: Progress | undefined;
  let received = 0;
  let resumed = resumedFrom;
  if (resumed) {
    process.stderr.write(
      `diskport: resuming ${path.basename(partFile)} at ${formatBytes(resumed)} of ${formatBytes(pending.total ?? 0)}\n`,
    );
  }
  const writer = { current: new SparseWriter(out, resumed) };
  let checkpointed = resumed;
  const checkpoint = async () => {
    const written = writer.current.written;
    if (pending.etag === undefined || written === checkpointed) return;
    await out.datasync();
    Object.assign(pending, { written, file_id: fileId });
    await saveManifest(dir, m);
    checkpointed = written;
  };
  const restart = async () => {
    resumed = 0;
    await out.truncate(0);
    writer.current = new SparseWriter(out, 0);
    Object.assign(pending, { etag: undefined, total: undefined, written: 0 });
    checkpointed = 0;
    await saveManifest(dir, m);
  };
  try {
    const fetchOnce = async (progressed: () => void): Promise<void> => {
      const w = writer.current;
      const from = w.written;
      if (pending.total !== undefined && from >= pending.total) return;
      const headers: Record<string, string> = { accept: 'application/octet-stream' };
      if (from > 0 && pending.etag)
        Object.assign(headers, { range: `bytes=${from}-`, 'if-range': pending.etag });
      try {
        let res: Awaited<ReturnType<typeof send>>;
        try {
          res = await send(ep, {
            method: 'GET',
            path: `/v1/vdis/${encodeURIComponent(snap)}/contents`,
            query: { format: 'qcow2', ...(pending.base && { base: pending.base }) },
            headers,
            management: true,
          });
        } catch (err) {
          if (pending.base && err instanceof HttpError && (err.status === 409 || err.status === 404)) {
            // 404 for the snapshot itself is final; for the base, or an unknown history, go full.
            if (!(await findVdi(ep, snap))) throw err;
            process.stderr.write(
              `diskport: the server cannot send the changes since ${pending.base} (${err.message}); this run is a full export\n`,
            );
            pending.base = null;
            await restart();
            return fetchOnce(progressed);
          }
          throw err;
        }
        if (res.statusCode === 200) {
          const length = Number(res.headers['content-length']);
          if (!Number.isSafeInteger(length)) {
            await res.body.dump();
            throw new HttpError(502, 'NO_LENGTH', 'the server did not send a Content-Length');
          }
          if (from > 0) {
            progress?.log('diskport: the export changed since the stopped run (new ETag); starting it over');
            await restart();
          }
          pending.total = length;
          pending.etag = typeof res.headers.etag === 'string' ? res.headers.etag : undefined;
          await saveManifest(dir, m);
        } else {
          const cr = CONTENT_RANGE.exec(String(res.headers['content-range'] ?? ''));
          if (!cr || Number(cr[1]) !== from) {
            await res.body.dump();
            throw new HttpError(
              502,
              'BAD_RANGE',
              `asked for bytes ${from}- and got ${res.headers['content-range'] ?? 'no Content-Range'}`,
            );
          }
          pending.total = Number(cr[3]);
        }
        const total = pending.total as number;
        if (!progress) {
          progress = createProgress(`backup ${pending.base ? 'delta' : 'full'}`, total, showProgress);
          onProgress(progress);
        }
        const cur = writer.current;
        const bar = progress;
        await cur.receive(res.body, total, async (bytes) => {
          received += bytes;
          bar.set(cur.pos);
          progressed();
          if (cur.written - checkpointed >= CHECKPOINT_BYTES) await checkpoint();
        });
      } catch (err) {
        throw signal.aborted ? new Interrupted() : err;
      }
    };
    await withRetry(retry, (_attempt, progressed) => fetchOnce(progressed));
    const total = pending.total ?? 0;
    await out.truncate(total);
    await out.datasync();
    return { total, received, resumed };
  } catch (err) {
    await checkpoint().catch(() => {});
    if (checkpointed > 0) {
      process.stderr.write(
        `diskport: ${formatBytes(checkpointed)} of this backup are kept in ${dir}; run the same command again to resume\n`,
      );
    }
    throw err;
  } finally {
    await out.close();
  }
}

/** The part file, cut back to what the stopped run synced if it is still that run's file; else empty. */
async function openPart(
  file: string,
  pending: PendingRun,
): Promise<{ out: fsp.FileHandle; fileId: string; resumedFrom: number }> {
  const kept =
    pending.written && pending.etag ? await fsp.open(file, 'r+').catch(() => undefined) : undefined;
  if (kept) {
    const st = await kept.stat();
    const fileId = `${st.dev}:${st.ino}`;
    if (fileId === pending.file_id) {
      await kept.truncate(pending.written);
      return { out: kept, fileId, resumedFrom: pending.written as number };
    }
    await kept.close();
  }
  Object.assign(pending, { etag: undefined, total: undefined, written: 0 });
  const out = await fsp.open(file, 'w');
  const st = await out.stat();
  return { out, fileId: `${st.dev}:${st.ino}`, resumedFrom: 0 };
}

/** Deletes on the server the snapshots of all runs but the newest `keep`; failures are said, not fatal. */
async function retire(ep: Endpoint, dir: string, m: Manifest, keep: number): Promise<string[]> {
  const deleted: string[] = [];
  const old = m.layers.slice(0, Math.max(0, m.layers.length - Math.max(1, keep)));
  for (const layer of old) {
    if (layer.snapshot_deleted) continue;
    try {
      await deleteVdi(ep, layer.snapshot);
      layer.snapshot_deleted = true;
      deleted.push(layer.snapshot);
    } catch (err) {
      process.stderr.write(
        `diskport: could not delete snapshot ${layer.snapshot} of an older run (${(err as Error).message}); the next run tries again\n`,
      );
    }
  }
  if (deleted.length) await saveManifest(dir, m);
  return deleted;
}

export function describeBackup(s: BackupSummary): string {
  return (
    `backed up VDI ${s.vdi} at snapshot ${s.snapshot}: ${s.kind === 'full' ? 'a full export' : `the changes since ${s.base}`}, ` +
    `${formatBytes(s.bytes)} in ${s.file}` +
    (s.bytes_resumed ? ` (${formatBytes(s.bytes_resumed)} from the stopped run)` : '') +
    `; the chain holds ${s.layers} file${s.layers === 1 ? '' : 's'}` +
    (s.snapshots_deleted.length
      ? `; deleted ${s.snapshots_deleted.length} older snapshot(s) on the server`
      : '') +
    (s.retries ? `; ${s.retries} retries` : '')
  );
}
