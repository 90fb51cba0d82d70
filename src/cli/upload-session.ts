/**
 * Which session an upload run uses, and how it lets go of it.
 *
 * A session is saved (saved-sessions.ts) as soon as it is open, one entry
 * per VDI, as the server allows one upload session per VDI. The next run of
 * the same command (same VDI, and the same file, unchanged) takes it up
 * again; a run for another file ends it first, since it holds the VDI,
 * unless the run that left it is still alive on this host.
 */
import os from 'node:os';
import { type Client, errorOf, request } from './http.js';
import { isTransient, type RetryPolicy, withRetry } from './retry.js';
import { SavedSessions, type SavedUpload, type UploadSource } from './saved-sessions.js';
import { openSession, type Session, sessionOf, type TransferJson, transferState } from './session.js';

export interface UploadSessionRun {
  session: Session;
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
  client: Client,
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
  const saved = new SavedSessions<SavedUpload>(opts.stateDir, 'upload', [opts.vdi]);
  let taken = await savedSession(client, saved, opts.source, opts.retry, opts.resume);
  const resumed = taken !== undefined;
  if (!taken) {
    const body = await opts.open();
    taken = await withRetry(opts.retry, () => openSession(client, body));
  }
  const { session, transfer } = taken;
  await saved.save({
    id: session.id,
    task_id: session.taskId,
    token: session.token,
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
    end: () => endSession(client, session, saved),
    forget: () => forget(saved, session),
  };
}

/**
 * The session an earlier run of the same command saved, if the server still
 * knows it as open, committing or committed. One an earlier run left for
 * another file, or any with --no-resume, is cancelled: it holds the VDI.
 */
async function savedSession(
  client: Client,
  saved: SavedSessions<SavedUpload>,
  source: UploadSource,
  retry: RetryPolicy,
  resume: boolean,
): Promise<{ session: Session; transfer: TransferJson } | undefined> {
  const entry = await saved.load();
  if (!entry) return undefined;
  if (entry.pid !== process.pid && entry.host === os.hostname() && isRunning(entry.pid)) {
    throw new Error(
      `another diskport run (pid ${entry.pid}) is uploading ${entry.source?.file ?? 'a file'} into this VDI; let it finish, or stop it first`,
    );
  }
  const session = sessionOf(client, entry);
  const same = JSON.stringify(entry.source) === JSON.stringify(source);
  if (resume && same) {
    try {
      const transfer = await withRetry(retry, () => transferState(client, session));
      if (['open', 'finalizing', 'committed'].includes(transfer.state) && transfer.size === source.size) {
        // Open: what it lacks is sent. Committing or committed: the earlier run stopped there, or
        // before it heard the answer; finalizing again waits for the commit or says how it ended.
        return { session, transfer };
      }
    } catch (err) {
      // Unreachable: opening a new session would fail the same way. Anything else: the session is gone.
      if (isTransient(err)) throw err;
    }
    await saved.remove();
    return undefined;
  }
  if (!same) {
    process.stderr.write(
      `diskport: cancelling upload session ${entry.id}, which an earlier run left open for ${entry.source?.file ?? 'another file'}\n`,
    );
  }
  await endSession(client, session, saved);
  return undefined;
}

/**
 * Cancels the session and forgets it, once the server says it has ended (or
 * never knew it). If the server cannot be reached, or is committing it, the
 * entry stays: the next run resumes it, or with --no-resume cancels it.
 */
async function endSession(
  client: Client,
  session: Session,
  saved: SavedSessions<SavedUpload>,
): Promise<void> {
  const path = `/v1/transfers/${encodeURIComponent(session.id)}?token=${encodeURIComponent(session.token)}`;
  let ended = false;
  try {
    const res = await request(client.server + path, {
      method: 'DELETE',
      dispatcher: client.agent,
      headersTimeout: 5000,
      bodyTimeout: 5000,
    });
    // 409 TRANSFER_NOT_ACTIVE: it ended already; TRANSFER_FINALIZING: it is being committed.
    const code = res.statusCode < 300 ? '' : (await errorOf(res, 'DELETE')).code;
    ended = res.statusCode < 300 || res.statusCode === 404 || code === 'TRANSFER_NOT_ACTIVE';
    if (res.statusCode < 300) await res.body.dump();
  } catch {
    // unreachable: the entry stays
  }
  if (ended) await forget(saved, session);
  else {
    process.stderr.write(
      `diskport: upload session ${session.id} could not be cancelled now; run the same command again to resume it, or with --no-resume to cancel it\n`,
    );
  }
}

/** Removes the saved entry if it is still this session's (a later run may have saved its own). */
async function forget(saved: SavedSessions<SavedUpload>, session: Session): Promise<void> {
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
