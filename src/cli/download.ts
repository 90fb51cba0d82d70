/**
 * `diskport download`: writes a VDI, in a wire format, to a file through a
 * download session. The body is read with `Range: bytes=N-` and
 * `If-Range: <etag>` after any network error, so a resume continues exactly
 * where the file ends, and starts over if the disk changed meanwhile (the
 * server then answers 200 with the whole new content). All-zero blocks are
 * not written: the output is sparse where the disk has holes, and is
 * truncated to its exact size at the end.
 *
 * Every CHECKPOINT_BYTES, and whenever a run stops short (the retries run
 * out, Ctrl-C, a full disk), the output is synced and how far it is written
 * is saved with the ETag (saved-sessions.ts). Running the same command again
 * continues from there with `Range` + `If-Range`, the way `curl -C -` does;
 * the file's own size cannot say how far it got, since holes are not written.
 */
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { HttpError, type RetryPolicy, withRetry } from '../transfer/retry-policy.js';
import { type Endpoint, openTransfer, type TransferSession } from '../transfer/transfer-client.js';
import { createProgress, formatBytes, type Progress } from './progress.js';
import { announcedRetries, Interrupted, interruptible } from './run.js';
import { type SavedDownload, SavedSessions } from './saved-sessions.js';
import { SparseWriter } from './sparse-writer.js';

/** How much a killed run can lose: the output is synced and its position saved this often. */
const CHECKPOINT_BYTES = 256 * 1024 * 1024;

export interface DownloadOptions {
  vdi: string;
  format: string;
  output: string;
  ttlSeconds?: number;
  progress: boolean;
  retry: RetryPolicy;
  /** Where the position of a stopped run is saved (saved-sessions.ts). */
  stateDir: string;
  /** Continue what an earlier run of the same command wrote (else start over). */
  resume: boolean;
}

export interface DownloadSummary {
  transfer: string;
  size: number;
  bytes_received: number;
  /** Bytes of zeros not written (left as holes). */
  bytes_sparse: number;
  /** Bytes an earlier run of the same command had written, not downloaded again. */
  bytes_resumed: number;
  restarts: number;
  retries: number;
}

const CONTENT_RANGE = /^bytes (\d+)-(\d+)\/(\d+)$/;

export async function download(server: Endpoint, opts: DownloadOptions): Promise<DownloadSummary> {
  // Ctrl-C: the GET is aborted, what arrived is flushed and saved, and the run ends.
  const interrupt = interruptible();
  try {
    return await downloadTo({ ...server, signal: interrupt.signal }, interrupt.signal, opts);
  } catch (err) {
    throw interrupt.signal.aborted ? new Interrupted() : err;
  } finally {
    interrupt.dispose();
  }
}

async function downloadTo(
  ep: Endpoint,
  signal: AbortSignal,
  opts: DownloadOptions,
): Promise<DownloadSummary> {
  let progress: Progress | undefined;
  const announced = announcedRetries(opts.retry, signal, () => progress);
  const retry = announced.policy;
  // The server's URL too: an ETag names a disk's generation on one server, and only there does
  // it say that the bytes written so far are still the disk's.
  const saved = new SavedSessions<SavedDownload>(opts.stateDir, 'download', [
    ep.base.href,
    opts.vdi,
    opts.format,
    path.resolve(opts.output),
  ]);
  let session: TransferSession;
  try {
    ({ session } = await withRetry(retry, () =>
      openTransfer(ep, {
        vdi: opts.vdi,
        direction: 'download',
        format: opts.format,
        ...(opts.ttlSeconds !== undefined && { ttl_seconds: opts.ttlSeconds }),
      }),
    ));
  } catch (err) {
    // The VDI is gone: nothing written so far will ever be continued. Any other refusal (a
    // missing token, say) leaves the position for a run that gets it right.
    if (err instanceof HttpError && err.status === 404) await saved.remove();
    throw err;
  }
  const { out, fileId, earlier } = await openOutput(
    opts.output,
    opts.resume ? await saved.load() : undefined,
  );
  // A file started afresh: an entry left for an earlier one must not describe it.
  if (!earlier) await saved.remove();
  let total = earlier?.total;
  let etag = earlier?.etag;
  let resumed = earlier?.written ?? 0;
  if (earlier) {
    process.stderr.write(
      `diskport: resuming the download into ${opts.output} at ${formatBytes(resumed)} of ${formatBytes(earlier.total)}\n`,
    );
  }
  let received = 0;
  let restarts = 0;
  let sparse = 0;
  const writer = { current: new SparseWriter(out, resumed) };
  let checkpointed = resumed;
  const checkpoint = async () => {
    const written = writer.current.written;
    if (etag === undefined || total === undefined || written === checkpointed) return;
    await out.datasync();
    await saved.save({ file_id: fileId, etag, total, written });
    checkpointed = written;
  };
  try {
    await withRetry(retry, async (_attempt, progressed) => {
      const w = writer.current;
      const from = w.written;
      if (total !== undefined && from >= total) return;
      const headers: Record<string, string> = {};
      if (from > 0) {
        headers.range = `bytes=${from}-`;
        if (etag) headers['if-range'] = etag;
      }
      try {
        const res = await session.read(headers);
        if (res.statusCode === 200) {
          const length = Number(res.headers['content-length']);
          if (!Number.isSafeInteger(length)) {
            await res.body.dump();
            throw new HttpError(502, 'NO_LENGTH', 'the server did not send a Content-Length');
          }
          if (from > 0) {
            // If-Range did not match: the disk changed since the first byte. Start over.
            progress?.log('diskport: the disk changed during the download (new ETag); starting over');
            restarts++;
            resumed = 0;
            await saved.remove();
            await out.truncate(0);
            sparse = 0;
            writer.current = new SparseWriter(out, 0);
            checkpointed = 0;
          }
          total = length;
          etag = typeof res.headers.etag === 'string' ? res.headers.etag : undefined;
        } else {
          const m = CONTENT_RANGE.exec(String(res.headers['content-range'] ?? ''));
          if (!m || Number(m[1]) !== from) {
            await res.body.dump();
            throw new HttpError(
              502,
              'BAD_RANGE',
              `asked for bytes ${from}- and got ${res.headers['content-range'] ?? 'no Content-Range'}`,
            );
          }
          total = Number(m[3]);
        }
        progress ??= createProgress(`download ${opts.format}`, total, opts.progress);
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
    });
    const size = total ?? 0;
    await out.truncate(size);
    await out.datasync();
    sparse += writer.current.skipped;
    progress?.stop();
    await saved.remove();
    // A download session ends when its holder is done with it.
    await session.cancel().catch(() => {});
    return {
      transfer: session.id,
      size,
      bytes_received: received,
      bytes_sparse: sparse,
      bytes_resumed: resumed,
      restarts,
      retries: announced.count(),
    };
  } catch (err) {
    progress?.stop();
    // Whatever stopped it (the link, Ctrl-C, a full disk, a session that expired while the
    // laptop slept), the bytes written are good as long as the ETag still matches next time.
    await checkpoint().catch(() => {});
    if (checkpointed > 0) {
      process.stderr.write(
        `diskport: ${formatBytes(checkpointed)} of ${opts.output} are kept; run the same command again to resume\n`,
      );
    }
    throw err;
  } finally {
    await out.close();
  }
}

/**
 * The output file: continued where an earlier run saved it was written up to
 * (anything after that is cut, as it was never synced), if it is still the
 * file that run wrote; else created afresh.
 */
async function openOutput(
  file: string,
  saved: SavedDownload | undefined,
): Promise<{ out: fsp.FileHandle; fileId: string; earlier?: SavedDownload }> {
  const kept = saved && (await fsp.open(file, 'r+').catch(() => undefined));
  if (kept && saved) {
    const fileId = idOf(await kept.stat());
    if (fileId === saved.file_id) {
      await kept.truncate(saved.written);
      return { out: kept, fileId, earlier: saved };
    }
    await kept.close();
  }
  const out = await fsp.open(file, 'w');
  return { out, fileId: idOf(await out.stat()) };
}

function idOf(st: { dev: number; ino: number }): string {
  return `${st.dev}:${st.ino}`;
}

export function describeDownload(s: DownloadSummary): string {
  return (
    `downloaded ${formatBytes(s.size)} (${formatBytes(s.bytes_sparse)} left as holes), received ${formatBytes(s.bytes_received)}` +
    (s.bytes_resumed ? ` after ${formatBytes(s.bytes_resumed)} from an earlier run` : '') +
    (s.retries ? `, ${s.retries} retries` : '') +
    (s.restarts ? `, ${s.restarts} restarts` : '')
  );
}
