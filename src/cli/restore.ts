/**
 * `diskport restore <dir> <vdi-url>`: writes the disk a backup directory
 * holds (backup-dir.ts) into a VDI: the full export first, then each delta
 * in order, each through a resumable upload session (upload.ts); then the
 * VDI's sha256 is compared with the one the backup recorded at that
 * snapshot.
 *
 * A delta is uploaded with `base=`, so the server lays it onto the VDI only
 * if the VDI still holds what the layer under it left there: after each
 * layer commits, the VDI is snapshotted (`diskport restore {snapshot}`),
 * and the next layer names that snapshot as its base (409 BASE_MISMATCH if
 * anything else wrote to the VDI meanwhile). Those snapshots also say how
 * far a stopped restore got: the next run continues after the newest one
 * (and a layer that was mid-upload resumes its session). They are deleted
 * when the restore ends.
 */
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { HttpError, type RetryPolicy, withRetry } from '../transfer/retry-policy.js';
import type { Endpoint } from '../transfer/transfer-client.js';
import { BackupDirError, chainTo, type Layer, loadManifest, MANIFEST, type Manifest } from './backup-dir.js';
import { formatBytes } from './progress.js';
import { announcedRetries, Interrupted, interruptible } from './run.js';
import { upload } from './upload.js';
import { deleteVdi, getVdi, sha256Of, snapshot, snapshotsOf, type VdiJson } from './vdi-api.js';

const MARK = 'diskport restore ';
const MiB = 1024 * 1024;

export interface RestoreOptions {
  dir: string;
  vdi: string;
  /** Restore the disk as it was at this backup's snapshot (default: the newest). */
  at?: string;
  progress: boolean;
  retry: RetryPolicy;
  stateDir: string;
  verbose?: boolean;
}

export interface RestoreSummary {
  vdi: string;
  /** The backup's snapshot the VDI now holds the disk of. */
  snapshot: string;
  layers: number;
  /** Layers an earlier, stopped restore had already written into the VDI. */
  layers_resumed: number;
  bytes_sent: number;
  sha256: string;
  retries: number;
}

export async function restore(server: Endpoint, opts: RestoreOptions): Promise<RestoreSummary> {
  const interrupt = interruptible();
  try {
    return await runRestore({ ...server, signal: interrupt.signal }, interrupt.signal, opts);
  } catch (err) {
    throw interrupt.signal.aborted ? new Interrupted() : err;
  } finally {
    interrupt.dispose();
  }
}

async function runRestore(ep: Endpoint, signal: AbortSignal, opts: RestoreOptions): Promise<RestoreSummary> {
  const dir = path.resolve(opts.dir);
  const m = await backupIn(dir);
  const chain = chainTo(m, opts.at);
  await checkFiles(dir, chain);
  const announced = announcedRetries(opts.retry, signal, () => undefined);
  const retry = announced.policy;
  const target = await withRetry(retry, () => getVdi(ep, opts.vdi));
  if (target.is_snapshot) {
    throw new BackupDirError(
      `VDI ${target.id} is a snapshot, which is read-only; restore into a writable VDI`,
    );
  }
  if (target.virtual_size !== m.virtual_size) {
    throw new BackupDirError(
      `VDI ${target.id} is ${target.virtual_size} bytes and the backed-up disk ${m.virtual_size}; ` +
        `restore into a VDI of ${m.virtual_size} bytes (create one, or resize this one with PATCH)`,
    );
  }
  const marksOf = async () =>
    (await withRetry(retry, () => snapshotsOf(ep, target.id))).filter((s) => s.name_label.startsWith(MARK));
  let marks = await marksOf();
  let { next, base } = continueAfter(chain, marks);
  const resumed = next;
  if (next > 0) {
    process.stderr.write(
      `diskport: continuing the restore into ${target.id}: ${next} of ${chain.length} layers are in it already\n`,
    );
  }
  let sent = 0;
  for (let i = next; i < chain.length; i++) {
    const layer = chain[i];
    const file = path.join(dir, layer.file);
    try {
      const summary = await upload(ep, {
        file,
        vdi: target.id,
        format: 'qcow2',
        chunkBytes: 8 * MiB,
        parallel: 1,
        checksum: false,
        progress: opts.progress,
        retry: opts.retry,
        verbose: opts.verbose,
        stateDir: opts.stateDir,
        resume: true,
        ...(i > 0 && base && { base }),
      });
      sent += summary.bytes_sent;
    } catch (err) {
      if (!(err instanceof HttpError && err.code === 'BASE_MISMATCH' && i === next && i > 0)) throw err;
      // What the stopped restore left in the VDI was overwritten since: begin again with the full.
      process.stderr.write(
        `diskport: VDI ${target.id} changed since the stopped restore wrote ${next} layers into it; starting over from the full export\n`,
      );
      next = 0;
      i = -1;
      base = undefined;
      continue;
    }
    signal.throwIfAborted();
    const label = `${MARK}${layer.snapshot}`;
    const mark = await withRetry(retry, async () => {
      const taken = (await snapshotsOf(ep, target.id)).find((s) => s.name_label === label);
      return taken ?? (await snapshot(ep, target.id, label));
    });
    base = mark.id;
    if (i < chain.length - 1) {
      process.stderr.write(
        `diskport: layer ${i + 1} of ${chain.length} (${layer.file}) is in VDI ${target.id}\n`,
      );
    }
  }
  const last = chain[chain.length - 1];
  const sha256 = await withRetry(retry, () => sha256Of(ep, target.id));
  marks = await marksOf();
  for (const s of marks) await withRetry(retry, () => deleteVdi(ep, s.id)).catch(() => {});
  if (sha256 !== last.sha256) {
    throw new HttpError(
      500,
      'CHECKSUM_MISMATCH',
      `VDI ${target.id} reads with sha256 ${sha256} after the restore, but the disk backed up at ${last.snapshot} had ${last.sha256}: ` +
        'something else wrote to the VDI, or a file of the backup was changed; check the files with qemu-img check and restore again',
    );
  }
  return {
    vdi: target.id,
    snapshot: last.snapshot,
    layers: chain.length,
    layers_resumed: resumed,
    bytes_sent: sent,
    sha256,
    retries: announced.count(),
  };
}

/** The directory's manifest; a directory without one is not a backup. */
async function backupIn(dir: string): Promise<Manifest> {
  const st = await fsp.stat(dir).catch(() => undefined);
  if (!st?.isDirectory()) throw new BackupDirError(`${dir} is not a directory; give a backup directory`);
  const exists = await fsp.stat(path.join(dir, MANIFEST)).catch(() => undefined);
  if (!exists) {
    throw new BackupDirError(
      `${dir} is not a diskport backup (it has no ${MANIFEST}); give the directory diskport backup wrote`,
    );
  }
  return (await loadManifest(dir)) as Manifest;
}

/** Every file of the chain is there, at the size it was written. */
async function checkFiles(dir: string, chain: Layer[]): Promise<void> {
  for (const layer of chain) {
    const st = await fsp.stat(path.join(dir, layer.file)).catch(() => undefined);
    if (!st)
      throw new BackupDirError(`${layer.file} of the backup in ${dir} is missing: the chain is broken`);
    if (st.size !== layer.bytes) {
      throw new BackupDirError(
        `${layer.file} of the backup in ${dir} is ${formatBytes(st.size)}, not the ${formatBytes(layer.bytes)} it was written with: the file is damaged`,
      );
    }
  }
}

/** Where a stopped restore got to: after the newest layer whose mark is on the VDI. */
function continueAfter(chain: Layer[], marks: VdiJson[]): { next: number; base?: string } {
  for (let i = chain.length - 1; i >= 0; i--) {
    const mark = marks.find((s) => s.name_label === `${MARK}${chain[i].snapshot}`);
    if (mark) return { next: i + 1, base: mark.id };
  }
  return { next: 0 };
}

export function describeRestore(s: RestoreSummary): string {
  return (
    `restored VDI ${s.vdi} to the disk backed up at ${s.snapshot}: ${s.layers} layer${s.layers === 1 ? '' : 's'}` +
    (s.layers_resumed ? ` (${s.layers_resumed} from the stopped run)` : '') +
    `, sent ${formatBytes(s.bytes_sent)}; sha256 ${s.sha256} matches the backup's`
  );
}
