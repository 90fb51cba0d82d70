/**
 * `diskport download`: writes a VDI, in a wire format, to a file through a
 * download session. The body is read with `Range: bytes=N-` and
 * `If-Range: <etag>` after any network error, so a resume continues exactly
 * where the file ends, and starts over if the disk changed meanwhile (the
 * server then answers 200 with the whole new content). All-zero blocks are
 * not written: the output is sparse where the disk has holes, and is
 * truncated to its exact size at the end.
 */
import { promises as fsp } from 'node:fs';
import { type Client, errorOf, HttpError, request } from './http.js';
import { createProgress, formatBytes, type Progress } from './progress.js';
import { announcedRetries, type RetryPolicy, withRetry } from './retry.js';
import { openSession } from './session.js';
import { isZero, ZERO_BLOCK_BYTES } from './sparse-reader.js';

/** Bytes gathered before they are checked for zeros and written. */
const WRITE_BATCH_BYTES = 1024 * 1024;

export interface DownloadOptions {
  vdi: string;
  format: string;
  output: string;
  ttlSeconds?: number;
  progress: boolean;
  retry: RetryPolicy;
}

export interface DownloadSummary {
  transfer: string;
  size: number;
  bytes_received: number;
  /** Bytes of zeros not written (left as holes). */
  bytes_sparse: number;
  restarts: number;
  retries: number;
}

/** Writes a stream at increasing offsets, skipping zero blocks (the file reads zeros there). */
class SparseWriter {
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  skipped = 0;

  constructor(
    private readonly out: fsp.FileHandle,
    /** Offset of the next byte to arrive. */
    public pos: number,
  ) {}

  /** Everything before this offset is on disk (or a hole). */
  get written(): number {
    return this.pos - this.pendingBytes;
  }

  async push(chunk: Buffer): Promise<void> {
    this.pending.push(chunk);
    this.pendingBytes += chunk.length;
    this.pos += chunk.length;
    if (this.pendingBytes >= WRITE_BATCH_BYTES) await this.flush();
  }

  async flush(): Promise<void> {
    if (!this.pendingBytes) return;
    const buf = this.pending.length === 1 ? this.pending[0] : Buffer.concat(this.pending);
    const base = this.pos - this.pendingBytes;
    this.pending = [];
    this.pendingBytes = 0;
    // Blocks on the absolute grid, so that a hole is recognised wherever the batch starts.
    let runStart = -1;
    let b = 0;
    while (b < buf.length) {
      const next = Math.min(
        buf.length,
        (Math.floor((base + b) / ZERO_BLOCK_BYTES) + 1) * ZERO_BLOCK_BYTES - base,
      );
      if (isZero(buf, b, next)) {
        if (runStart >= 0) await this.write(buf, runStart, b, base);
        runStart = -1;
        this.skipped += next - b;
      } else if (runStart < 0) {
        runStart = b;
      }
      b = next;
    }
    if (runStart >= 0) await this.write(buf, runStart, buf.length, base);
  }

  private async write(buf: Buffer, start: number, end: number, base: number): Promise<void> {
    for (let off = start; off < end; ) {
      const { bytesWritten } = await this.out.write(buf, off, end - off, base + off);
      off += bytesWritten;
    }
  }
}

const CONTENT_RANGE = /^bytes (\d+)-(\d+)\/(\d+)$/;

export async function download(client: Client, opts: DownloadOptions): Promise<DownloadSummary> {
  let progress: Progress | undefined;
  const announced = announcedRetries(opts.retry, () => progress);
  const retry = announced.policy;
  const { session } = await withRetry(retry, () =>
    openSession(client, {
      vdi: opts.vdi,
      direction: 'download',
      format: opts.format,
      ...(opts.ttlSeconds !== undefined && { ttl_seconds: opts.ttlSeconds }),
    }),
  );
  const out = await fsp.open(opts.output, 'w');
  let total: number | undefined;
  let etag: string | undefined;
  let received = 0;
  let restarts = 0;
  let sparse = 0;
  const writer = { current: new SparseWriter(out, 0) };
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
      const res = await request(session.dataUrl, { method: 'GET', headers, dispatcher: client.agent });
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
          await out.truncate(0);
          sparse = 0;
          writer.current = new SparseWriter(out, 0);
        }
        total = length;
        etag = typeof res.headers.etag === 'string' ? res.headers.etag : undefined;
      } else if (res.statusCode === 206) {
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
      } else {
        throw await errorOf(res, 'GET data');
      }
      progress ??= createProgress(`download ${opts.format}`, total, opts.progress);
      const cur = writer.current;
      try {
        for await (const chunk of res.body) {
          await cur.push(chunk as Buffer);
          received += (chunk as Buffer).length;
          progress.set(cur.pos);
          progressed();
        }
      } finally {
        // What arrived is good: keep it, and resume after it.
        await cur.flush();
      }
      if (cur.written < total) {
        throw new HttpError(502, 'SHORT_BODY', `the body ended at byte ${cur.written} of ${total}`);
      }
    });
    const size = total ?? 0;
    await out.truncate(size);
    await out.datasync();
    sparse += writer.current.skipped;
    progress?.stop();
    // A download session ends when its holder is done with it.
    await request(
      `${client.server}/v1/transfers/${encodeURIComponent(session.id)}?token=${encodeURIComponent(session.token)}`,
      {
        method: 'DELETE',
        dispatcher: client.agent,
      },
    )
      .then((r) => r.body.dump())
      .catch(() => {});
    return {
      transfer: session.id,
      size,
      bytes_received: received,
      bytes_sparse: sparse,
      restarts,
      retries: announced.count(),
    };
  } catch (err) {
    progress?.stop();
    throw err;
  } finally {
    await out.close();
  }
}

export function describeDownload(s: DownloadSummary): string {
  return (
    `downloaded ${formatBytes(s.size)} (${formatBytes(s.bytes_sparse)} left as holes), received ${formatBytes(s.bytes_received)}` +
    (s.retries ? `, ${s.retries} retries` : '') +
    (s.restarts ? `, ${s.restarts} restarts` : '')
  );
}
