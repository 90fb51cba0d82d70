/**
 * `diskport upload`: sends a file into a VDI through a resumable session.
 *
 * The file is cut into chunks on a grid of --chunk-size; holes (SEEK_HOLE)
 * and all-zero blocks are not sent, since the server's staging file starts
 * sparse. Chunks go up --parallel at a time, each with Content-Range. When a
 * request fails on the network, the chunk is retried with backoff, and only
 * its parts the server has not recorded (GET the session's `received`) are
 * sent again. Finalize commits; if the server says ranges are missing (a
 * server that wants every byte, zeros included), they are sent and finalize
 * runs again.
 *
 * Which session a run uses is upload-session.ts's business: the one an
 * earlier run of the same command left open (then only what the server
 * lacks is sent), or a new one. When the network or the server stays down
 * past the retries, the server is out of space, or the run is stopped
 * (Ctrl-C, SIGTERM, a kill), the session is left open for the next run of
 * the same command; a refusal from the server ends it, and so does
 * `--cancel`.
 */
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import { type ByteRange as Range, RangeSet } from '../transfer/range-set.js';
import { HttpError, isTransient, type RetryPolicy, withRetry } from '../transfer/retry-policy.js';
import { type Endpoint, getTask, type TaskJson, type TransferSession } from '../transfer/transfer-client.js';
import { createProgress, formatBytes, type Progress } from './progress.js';
import { announcedRetries, Interrupted, interruptible } from './run.js';
import { dataPieces, dataRuns, type Piece } from './sparse-reader.js';
import { takeUploadSession } from './upload-session.js';

const HASH_BLOCK_BYTES = 4 * 1024 * 1024;
const FINALIZE_WAIT_SECONDS = 300;
/** Rounds of "finalize says bytes are missing, send them" before giving up. */
const MAX_FILL_ROUNDS = 3;

export interface UploadOptions {
  file: string;
  vdi: string;
  format: string;
  chunkBytes: number;
  parallel: number;
  checksum: boolean;
  ttlSeconds?: number;
  progress: boolean;
  retry: RetryPolicy;
  /** Logs each request on stderr. */
  verbose?: boolean;
  /** Where sessions are saved for a later run (saved-sessions.ts). */
  stateDir: string;
  /** Continue the session an earlier run of the same command left open (else cancel it and start over). */
  resume: boolean;
  /** A delta (a qcow2 overlay, a differencing VHD): the snapshot the VDI must still hold, or `current`. */
  base?: string;
}

export interface UploadSummary {
  transfer: string;
  task: TaskJson;
  size: number;
  /** Payload bytes put on the wire (retries included; headers not). */
  bytes_sent: number;
  /** Bytes never sent: holes and zero blocks. */
  bytes_skipped: number;
  /** Zeros sent because finalize asked for them. */
  zero_bytes_filled: number;
  /** Bytes the server already had from an earlier run of the same command. */
  bytes_resumed: number;
  retries: number;
}

async function readFull(handle: fsp.FileHandle, start: number, end: number): Promise<Buffer> {
  const buf = Buffer.allocUnsafe(end - start);
  let got = 0;
  while (got < buf.length) {
    const { bytesRead } = await handle.read(buf, got, buf.length - got, start + got);
    if (bytesRead === 0) throw new Error(`the source file shrank while it was read (at byte ${start + got})`);
    got += bytesRead;
  }
  return buf;
}

/** The parts of [start, end) not covered by `ranges` (in any order, overlapping or not). */
function missingIn(ranges: readonly Range[], start: number, end: number): Range[] {
  return new RangeSet(ranges).missing(start, end);
}

async function sha256Of(handle: fsp.FileHandle, size: number, signal: AbortSignal): Promise<string> {
  const hash = createHash('sha256');
  for (let pos = 0; pos < size; pos += HASH_BLOCK_BYTES) {
    signal.throwIfAborted();
    hash.update(await readFull(handle, pos, Math.min(size, pos + HASH_BLOCK_BYTES)));
  }
  return hash.digest('hex');
}

export async function upload(server: Endpoint, opts: UploadOptions): Promise<UploadSummary> {
  // Ctrl-C aborts every request and wait of the run; the session stays for the next one.
  const interrupt = interruptible();
  const ep: Endpoint = { ...server, signal: interrupt.signal };
  try {
    return await uploadFile(ep, interrupt.signal, opts);
  } catch (err) {
    throw interrupt.signal.aborted ? new Interrupted() : err;
  } finally {
    interrupt.dispose();
  }
}

async function uploadFile(ep: Endpoint, signal: AbortSignal, opts: UploadOptions): Promise<UploadSummary> {
  const handle = await fsp.open(opts.file, 'r');
  try {
    const stat = await handle.stat();
    if (!stat.isFile()) throw new Error(`${opts.file} is not a regular file`);
    const size = stat.size;
    let progress: Progress | undefined;
    const announced = announcedRetries(opts.retry, signal, () => progress);
    const retry = announced.policy;
    const run = await takeUploadSession(ep, {
      vdi: opts.vdi,
      stateDir: opts.stateDir,
      resume: opts.resume,
      retry,
      source: {
        file: await fsp.realpath(opts.file),
        format: opts.format,
        size,
        mtime_ms: stat.mtimeMs,
        checksum: opts.checksum,
        ...(opts.base !== undefined && { base: opts.base }),
      },
      open: async () => {
        const checksum = opts.checksum ? `sha256:${await sha256Of(handle, size, signal)}` : undefined;
        return {
          vdi: opts.vdi,
          direction: 'upload',
          format: opts.format,
          size,
          ...(checksum && { checksum }),
          ...(opts.base !== undefined && { base: opts.base }),
          ...(opts.ttlSeconds !== undefined && { ttl_seconds: opts.ttlSeconds }),
        };
      },
    });
    const { session, finalizing } = run;
    const received = run.transfer.received;
    const have = new RangeSet(received);
    const resumedBytes = have.size();
    if (run.resumed) {
      process.stderr.write(
        `diskport: resuming upload session ${session.id}: the server has ${formatBytes(resumedBytes)} of ${formatBytes(size)}\n`,
      );
    }
    progress = createProgress(`upload ${opts.format}`, size, opts.progress);
    let ended = false;
    const sender = new ChunkSender(session, size, retry, opts.verbose ? (l) => progress?.log(l) : undefined);
    try {
      // Stopped while the session was being opened: it is saved, and kept.
      signal.throwIfAborted();
      const { pieces, holeBytes } = dataPieces(handle, size, opts.chunkBytes);
      let done = holeBytes;
      let skipped = holeBytes;
      progress.set(done);
      const queue = finalizing ? [] : [...pieces];
      const sent: Range[] = [...received];
      const worker = async () => {
        for (let p = queue.shift(); p; p = queue.shift()) {
          signal.throwIfAborted();
          // What an earlier run already delivered is neither read nor sent again.
          if (have.missing(p.start, p.end).length) {
            const buf = await readFull(handle, p.start, p.end);
            const runs = dataRuns(buf, p.start);
            for (const r of runs) {
              for (const [s, e] of have.missing(r.start, r.end)) {
                await sender.send({ start: s, end: e }, buf.subarray(s - p.start, e - p.start));
              }
            }
            sent.push(...runs.map((r): Range => [r.start, r.end]));
            skipped += p.end - p.start - runs.reduce((n, r) => n + r.end - r.start, 0);
          }
          done += p.end - p.start;
          progress?.set(done);
        }
      };
      await Promise.all(Array.from({ length: Math.max(1, opts.parallel) }, worker));
      // Everything not sent reads as zeros: say so, a few requests for any number of holes.
      for (const [s, e] of finalizing ? [] : missingIn(sent, 0, size)) {
        await withRetry(retry, () => session.zero(s, e));
      }

      let filled = 0;
      let task: TaskJson | undefined;
      for (let round = 0; !task; round++) {
        try {
          task = await finalize(ep, session, run.transfer.task_id, retry);
        } catch (err) {
          if (!(err instanceof HttpError && err.code === 'TRANSFER_INCOMPLETE') || round >= MAX_FILL_ROUNDS) {
            throw err;
          }
          // The server wants bytes we skipped (zeros), or a write it lost: send them as they are.
          const state = await withRetry(retry, () => session.state());
          const missing = missingIn(state.received, 0, size);
          const chunks = missing.flatMap(([s, e]) => {
            const out: Piece[] = [];
            for (let pos = s; pos < e; pos += opts.chunkBytes) {
              out.push({ start: pos, end: Math.min(e, pos + opts.chunkBytes) });
            }
            return out;
          });
          const fill = async () => {
            for (let c = chunks.shift(); c; c = chunks.shift()) {
              await sender.send(c, await readFull(handle, c.start, c.end));
              filled += c.end - c.start;
              skipped -= c.end - c.start;
            }
          };
          await Promise.all(Array.from({ length: Math.max(1, opts.parallel) }, fill));
        }
      }
      progress.set(size);
      progress.stop();
      // The session has ended, however its task did: nothing is left for a later run.
      ended = true;
      await run.forget();
      if (task.status !== 'success') {
        throw new HttpError(
          500,
          task.error?.code ?? 'INTERNAL_ERROR',
          task.error?.message ?? `the import ended as ${task.status}`,
        );
      }
      return {
        transfer: session.id,
        task,
        size,
        bytes_sent: sender.bytesSent,
        bytes_skipped: Math.max(0, skipped),
        zero_bytes_filled: filled,
        bytes_resumed: resumedBytes,
        retries: announced.count(),
      };
    } catch (err) {
      progress.stop();
      const kept = `upload session ${session.id} stays open for ${run.transfer.ttl_seconds} s`;
      const next = 'run the same command again to resume it, or add --cancel to cancel it';
      if (ended) {
        // the import task failed: the session is over, and said so
      } else if (signal.aborted) {
        process.stderr.write(`diskport: interrupted; ${kept}: ${next}\n`);
      } else if (err instanceof HttpError && err.status === 507) {
        // Out of space is an answer, not an accident; what arrived waits for room to be made.
        process.stderr.write(
          `diskport: the server is out of space; ${kept}: free space there, then ${next}\n`,
        );
      } else if (isTransient(err)) {
        // The link or the server is down for longer than the retries: what arrived stays, for the next run.
        process.stderr.write(`diskport: ${kept}; ${next}\n`);
      } else {
        // A refusal: the session is of no further use, and an open one holds the VDI (VDI_BUSY).
        await run.end();
      }
      throw err;
    }
  } finally {
    await handle.close();
  }
}

/** PUTs ranges of the stream, each retried until the server has all of it. */
class ChunkSender {
  bytesSent = 0;

  constructor(
    private readonly session: TransferSession,
    private readonly size: number,
    private readonly retry: RetryPolicy,
    private readonly log?: (line: string) => void,
  ) {}

  async send(range: Piece, data: Buffer): Promise<void> {
    await withRetry(this.retry, async (attempt, progressed) => {
      let todo: Range[] = [[range.start, range.end]];
      // After a failure, ask what arrived: a cut connection keeps the bytes that made it.
      if (attempt > 1) {
        todo = missingIn((await this.session.state()).received, range.start, range.end);
        this.log?.(`diskport: bytes ${range.start}-${range.end - 1}: missing ${JSON.stringify(todo)}`);
      }
      for (const [s, e] of todo) {
        const body = data.subarray(s - range.start, e - range.start);
        this.bytesSent += body.length;
        this.log?.(`diskport: PUT bytes ${s}-${e - 1}/${this.size}`);
        await this.session.put(s, body, this.size);
        progressed();
      }
    });
  }
}

/** Commits the session and waits for its task; a lost answer is recovered from the session's state. */
async function finalize(
  ep: Endpoint,
  session: TransferSession,
  taskId: string,
  retry: RetryPolicy,
): Promise<TaskJson> {
  return withRetry(retry, async () => {
    let task: TaskJson;
    try {
      task = await session.finalize(FINALIZE_WAIT_SECONDS);
    } catch (err) {
      // An earlier finalize whose answer was lost got there first.
      if (err instanceof HttpError && err.code === 'TRANSFER_NOT_ACTIVE') return taskOf(ep, taskId, err);
      throw err;
    }
    if (task.status === 'pending' || task.status === 'running') {
      // Still committing after the long poll: ask again (finalize of a finalizing session waits too).
      throw new HttpError(503, 'STILL_RUNNING', 'the commit is still running');
    }
    return task;
  });
}

async function taskOf(ep: Endpoint, taskId: string, cause: HttpError): Promise<TaskJson> {
  const state = (cause.details?.state as string | undefined) ?? '';
  try {
    return await getTask(ep, taskId, 30);
  } catch (err) {
    // Tasks need the management token; the session's state says enough without it.
    if (!(err instanceof HttpError) || (err.status !== 401 && err.status !== 403)) throw err;
    if (state === 'committed') {
      return { id: taskId, status: 'success', progress: 1, error: null, result: null };
    }
    throw new HttpError(409, cause.code, `the transfer ended as ${state || 'unknown'}: ${cause.message}`);
  }
}

export function describeUpload(s: UploadSummary): string {
  return (
    `uploaded ${formatBytes(s.size)}: sent ${formatBytes(s.bytes_sent)}, skipped ${formatBytes(s.bytes_skipped)} of zeros` +
    (s.zero_bytes_filled ? ` (the server asked for ${formatBytes(s.zero_bytes_filled)} of zeros)` : '') +
    (s.bytes_resumed ? `, resumed with ${formatBytes(s.bytes_resumed)} already on the server` : '') +
    (s.retries ? `, ${s.retries} retries` : '') +
    `; task ${s.task.id}`
  );
}
