/**
 * What lets a later run of the same command pick up where an earlier one
 * stopped: a small JSON file per transfer in a state directory, the way tus
 * clients keep an upload's URL under a fingerprint of the file.
 *
 * An upload saves its session (id and token) as soon as it is open, so even a
 * killed run leaves it behind; a download saves how far its output file is
 * durably written, and the ETag that must still match. The entry is removed
 * when the transfer ends for good (done, cancelled, or refused by the server).
 * Files are written 0600 (a session token is a credential) and replaced by
 * rename, so a crash leaves the old entry or the new one, never half of one.
 */
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

/** $DISKPORT_STATE_DIR, else $XDG_STATE_HOME/diskport, else ~/.local/state/diskport. */
export function defaultStateDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.DISKPORT_STATE_DIR) return env.DISKPORT_STATE_DIR;
  const base = env.XDG_STATE_HOME || path.join(os.homedir(), '.local', 'state');
  return path.join(base, 'diskport');
}

/** An upload session, as `sessionOf` takes it, and what it was sending. */
export interface SavedUpload {
  id: string;
  task_id: string;
  token: string;
  data_path: string;
  source: UploadSource;
  /** The run that holds it: another run of this host leaves a live one alone. */
  pid: number;
  host: string;
}

/** What makes a later upload into the same VDI "the same command": the same file, unchanged. */
export interface UploadSource {
  file: string;
  format: string;
  size: number;
  mtime_ms: number;
  checksum: boolean;
  /** A delta's base: a session opened against another base is not this command's. */
  base?: string;
}

export interface SavedDownload {
  /** The output file's identity (`dev:ino`): a file put in its place since is not continued. */
  file_id: string;
  etag: string;
  /** Size of the whole download. */
  total: number;
  /** Every byte before this offset is in the output file (or a hole there), synced. */
  written: number;
}

export class SavedSessions<T extends object> {
  private readonly file: string;
  private warned = false;

  /** `identity`: what names the entry (an upload's VDI; a download's server, VDI, format and output). */
  constructor(dir: string, kind: 'upload' | 'download', identity: readonly (string | number | boolean)[]) {
    const key = createHash('sha256')
      .update(JSON.stringify([kind, ...identity]))
      .digest('hex')
      .slice(0, 32);
    this.file = path.join(dir, `${kind}-${key}.json`);
  }

  /** The saved entry, or undefined when there is none (or it cannot be read: it is then ignored). */
  async load(): Promise<T | undefined> {
    try {
      return JSON.parse(await fsp.readFile(this.file, 'utf8')) as T;
    } catch {
      return undefined;
    }
  }

  /**
   * Saves the entry. Best effort: a state directory that cannot be written
   * (a read-only home, say) costs the next run its head start, not this run
   * its transfer, so the failure is said once on stderr and the run goes on.
   */
  async save(value: T): Promise<void> {
    const tmp = `${this.file}.${process.pid}.tmp`;
    try {
      await fsp.mkdir(path.dirname(this.file), { recursive: true, mode: 0o700 });
      await fsp.writeFile(tmp, `${JSON.stringify({ ...value, saved_at: new Date().toISOString() })}\n`, {
        mode: 0o600,
      });
      await fsp.rename(tmp, this.file);
    } catch (err) {
      await fsp.rm(tmp, { force: true }).catch(() => {});
      if (!this.warned) {
        this.warned = true;
        process.stderr.write(
          `diskport: cannot save this run's state in ${path.dirname(this.file)} (${(err as Error).message}); a later run will not be able to resume it\n`,
        );
      }
    }
  }

  async remove(): Promise<void> {
    await fsp.rm(this.file, { force: true }).catch(() => {});
  }
}
