/**
 * Which session an upload run uses, and how it lets go of it.
 *
 * A session is saved (saved-sessions.ts) as soon as it is open, one entry
 * per VDI, as the server allows one upload session per VDI. The next run of
 * the same command (same VDI, and the same file, unchanged) takes it up
 * again; a run for another file ends it first, since it holds the VDI,
 * unless the run that left it is still alive on this host. `--cancel` ends
 * it on purpose.
 */
import os from 'node:os';
import { HttpError, isTransient, type RetryPolicy, withRetry } from '../transfer/retry-policy.js';
import {
  type Endpoint,
  openTransfer,
  type TransferJson,
  TransferSession,
} from '../transfer/transfer-client.js';
import { SavedSessions, type SavedUpload, type UploadSource } from './saved-sessions.js';

/** How long a cancel may take before the session is left for a later run to end. */
const CANCEL_TIMEOUT_MS = 5000;

export interface UploadSessionRun {
  session: TransferSession;
  /** The session as the server described it when this run took it. */
  transfer: TransferJson;
  /** Taken up from an earlier run. */
  resumed: boolean;
  /** The earlier run got as far as committing: nothing to send, finalize again. */
  finalizing: boolean;
  /** Cancels the session and forgets it; if the server cannot be reached, it is kept for the next run. */
  end(): Promise<void>;
  /** Forgets the session, which ended by itself (committed, or its import failed). */
  forget(): Promise<void>;
}

export async function takeUploadSession(
  ep: Endpoint,
  opts: {
    vdi: string;
    stateDir: string;
    resume: boolean;
    retry: RetryPolicy;
    source: UploadSource;
    /** The body of POST /v1/transfers, should a new session be needed (it may hash the file). */
    open: () => Promise<Record<string, unknown>>;
  },
): Promise<UploadSessionRun> {
  const saved = savedUploads(opts.stateDir, opts.vdi);
  let taken = await savedSession(ep, saved, opts.source, opts.retry, opts.resume);
  const resumed = taken !== undefined;
  if (!taken) {
    const body = await opts.open();
    taken = await withRetry(opts.retry, () => openTransfer(ep, body));
  }
  const { session, transfer } = taken;
  await saved.save({
    id: session.id,
    task_id: transfer.task_id,
    token: session.ref.token,
    data_path: transfer.data_path,
    source: opts.source,
    pid: process.pid,
    host: os.hostname(),
  });
  return {
    session,
    transfer,
    resumed,
    finalizing: resumed && transfer.state !== 'open',
    end: () => endSession(session, saved),
    forget: () => forget(saved, session),
  };
}

/**
 * `diskport upload FILE --vdi ID --cancel`: ends the session an earlier run
 * left open for this VDI, so the VDI is free and stays as it was. Resolves
 * with a line for stderr; throws when there is nothing to cancel, or it
 * cannot be cancelled now.
 */
export async function cancelSavedUpload(
  ep: Endpoint,
  opts: { vdi: string; stateDir: string },
): Promise<string> {
  const saved = savedUploads(opts.stateDir, opts.vdi);
  const entry = await saved.load();
  if (!entry) {
    throw new Error(
      `no upload into VDI ${opts.vdi} was left open by an earlier run (nothing saved in ${opts.stateDir}); a session opened otherwise ends with DELETE /v1/transfers/{id}`,
    );
  }
  refuseIfLive(entry);
  const session = new TransferSession(ep, { id: entry.id, token: entry.token });
  const outcome = await cancel(session);
  if (outcome instanceof HttpError) {
    throw new Error(`cannot cancel upload session ${entry.id}: ${outcome.message} (${outcome.code})`);
  }
  if (outcome === 'unreachable') {
    throw new Error(`the server could not be reached to cancel upload session ${entry.id}; try again`);
  }
  if (outcome === 'finalizing') {
    throw new Error(
      `upload session ${entry.id} is being committed and can no longer be cancelled; run the same upload command to see how it ends`,
    );
  }
  await saved.remove();
  const of = entry.source?.file ? ` (${entry.source.file})` : '';
  return outcome === 'cancelled'
    ? `cancelled upload session ${entry.id}${of}; VDI ${opts.vdi} is as it was, and free`
    : `upload session ${entry.id}${of} had already ended; nothing was left to cancel`;
}

function savedUploads(stateDir: string, vdi: string): SavedSessions<SavedUpload> {
  return new SavedSessions<SavedUpload>(stateDir, 'upload', [vdi]);
}

/** A session saved by a run still alive on this host is that run's: leave it alone. */
function refuseIfLive(entry: SavedUpload): void {
  if (entry.pid !== process.pid && entry.host === os.hostname() && isRunning(entry.pid)) {
    throw new Error(
      `another diskport run (pid ${entry.pid}) is uploading ${entry.source?.file ?? 'a file'} into this VDI; let it finish, or stop it first`,
    );
  }
}

/**
 * The session an earlier run of the same command saved, if the server still
 * knows it as open, committing or committed. One an earlier run left for
 * another file, or any with --no-resume, is cancelled: it holds the VDI.
 */
async function savedSession(
  ep: Endpoint,
  saved: SavedSessions<SavedUpload>,
  source: UploadSource,
  retry: RetryPolicy,
  resume: boolean,
): Promise<{ session: TransferSession; transfer: TransferJson } | undefined> {
  const entry = await saved.load();
  if (!entry) return undefined;
  refuseIfLive(entry);
  const session = new TransferSession(ep, { id: entry.id, token: entry.token });
  const same = JSON.stringify(entry.source) === JSON.stringify(source);
  if (resume && same) {
    try {
      const transfer = await withRetry(retry, () => session.state());
      if (['open', 'finalizing', 'committed'].includes(transfer.state) && transfer.size === source.size) {
        // Open: what it lacks is sent. Committing or committed: the earlier run stopped there, or
        // before it heard the answer; finalizing again waits for the commit or says how it ended.
        return { session, transfer };
      }
    } catch (err) {
      // Unreachable (or Ctrl-C): opening a new session would fail the same way. Anything else: it is gone.
      if (isTransient(err) || ep.signal?.aborted) throw err;
    }
    await saved.remove();
    return undefined;
  }
  if (!same) {
    process.stderr.write(
      `diskport: cancelling upload session ${entry.id}, which an earlier run left open for ${entry.source?.file ?? 'another file'}\n`,
    );
  }
  await endSession(session, saved);
  return undefined;
}

/** DELETE: 'cancelled', 'ended' (it had already), 'finalizing' (being committed), 'unreachable', or the refusal. */
async function cancel(
  session: TransferSession,
): Promise<'cancelled' | 'ended' | 'finalizing' | 'unreachable' | HttpError> {
  try {
    await session.cancel({ timeoutMs: CANCEL_TIMEOUT_MS });
    return 'cancelled';
  } catch (err) {
    if (!(err instanceof HttpError)) return 'unreachable';
    if (err.status === 404 || err.code === 'TRANSFER_NOT_ACTIVE') return 'ended';
    if (err.code === 'TRANSFER_FINALIZING') return 'finalizing';
    return isTransient(err) ? 'unreachable' : err;
  }
}

/**
 * Cancels the session and forgets it, once the server says it has ended (or
 * never knew it). If the server cannot be reached, or is committing it, the
 * entry stays: the next run resumes it, or with --cancel ends it.
 */
async function endSession(session: TransferSession, saved: SavedSessions<SavedUpload>): Promise<void> {
  const outcome = await cancel(session);
  if (outcome === 'cancelled' || outcome === 'ended') await forget(saved, session);
  else {
    process.stderr.write(
      `diskport: upload session ${session.id} could not be cancelled now; run the same command again to resume it, or with --cancel to cancel it\n`,
    );
  }
}

/** Removes the saved entry if it is still this session's (a later run may have saved its own). */
async function forget(saved: SavedSessions<SavedUpload>, session: TransferSession): Promise<void> {
  if ((await saved.load())?.id === session.id) await saved.remove();
}

function isRunning(pid: unknown): boolean {
  if (typeof pid !== 'number') return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}
