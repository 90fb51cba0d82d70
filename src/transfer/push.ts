/**
 * Push (replication): `POST /v1/transfers {vdi, direction: "download", format, target_url}`
 * where target_url is the upload `url` of a transfer opened on another
 * diskport (it carries ?token=, the only credential needed). This side sends
 * the disk there as the session's task, then finalizes the receiver and
 * waits for its commit; the local task fails if the remote one does.
 *
 * - raw: only allocated extents cross the wire, as `Content-Range: bytes
 *   a-b/total` chunks of at most CHUNK_BYTES (the first one's total fixes the
 *   receiver's Upload-Length); holes, and chunks that read as zeros, are sent
 *   as ovirt-imageio zero ops (`PATCH .../data {"op":"zero"}`): no byte of
 *   them travels, and the receiver knows they are complete.
 * - vhd, qcow2 (a delta included): the serialized stream (the export's
 *   layout, already compact), what the receiver misses of it in one streamed
 *   `Content-Range` PUT, read ahead while the bytes before go out: no round
 *   trip and no flush point per piece. The receiver writes the bytes as they
 *   arrive and keeps what arrived when the connection breaks (recorded
 *   durably at least every second), so a resume sends only the rest.
 * - After a broken connection (exponential backoff, bounded attempts without
 *   progress) it asks the receiver what it holds (`GET /v1/transfers/{id}`
 *   → `received`) and sends only what is missing.
 *
 * The receiver's session stays open when a push fails, so another push (or
 * any client) can complete it.
 */
import { ApiError } from '../errors.js';
import { isZero } from '../image/zero.js';
import { sealSecret } from '../secrets.js';
import type { VdiStore } from '../storage/vdis.js';
import type { RunningTask } from '../tasks/task-manager.js';
import { openExport } from './export.js';
import { FetchGuard, type FetchTarget, pinnedAgent } from './fetch-guard.js';
import { openKeptUrl, type PullDeps, redact } from './pull.js';
import { type ByteRange, RangeSet } from './range-set.js';
import { backoff, describe, HttpError, isTransient, SERVER_RETRY } from './retry-policy.js';
import type { CreateTransfer } from './sessions.js';
import { type TaskJson, type TransferJson, TransferSession } from './transfer-client.js';
import type { Transfer } from './transfer-store.js';

/** Largest chunk in one PUT of a raw push: what a broken connection can cost at most. */
export const CHUNK_BYTES = 8 * 1024 * 1024;
/** A streamed PUT renews the local session after this many bytes (and at its end). */
const RENEW_EVERY_BYTES = 64 * 1024 * 1024;
/** Long-poll of the receiver's finalize, per request. */
const FINALIZE_WAIT_SECONDS = 30;
/** Times the receiver may answer TRANSFER_INCOMPLETE to a finalize before the push gives up. */
const MAX_FILL_ROUNDS = 3;

export type PushRequest = CreateTransfer & { target_url: string };

/** What a push uses: a pull's needs, and the VDIs it reads from. */
export interface PushDeps extends PullDeps {
  vdis: VdiStore;
}

/**
 * Startup: pushes whose session survived a restart go on; the receiver's
 * ranges say what it already has, so nothing is sent twice.
 */
export async function resumePushes(
  s: PushDeps,
  othersOwn: (t: Transfer) => boolean = () => false,
  only: (t: Transfer) => boolean = () => true,
): Promise<void> {
  for (const t of s.transfers.list({ active: true })) {
    const kept = t.push_target;
    if (t.direction !== 'download' || t.state !== 'open' || !kept || othersOwn(t) || !only(t)) continue;
    // Another live node's push: that node runs it.
    if (!s.transfers.activeSession(t.id)) continue;
    // Nothing can reach the receiver without it: the push ends, and its receiver's session stays open for another.
    const raw = openKeptUrl(s, t.id, kept, "the push cannot resume: its receiver's URL", 'the push');
    if (raw === null) continue;
    try {
      const ref = parseTargetUrl(raw);
      const target = await new FetchGuard(s.config.allowFetch).check(raw, 'target_url');
      s.transfers.runJob(t.id, (task) =>
        new Push(s, t.id, t, receiverOf(target, ref, task.signal), task).run(),
      );
      s.logger.info({ transfer: t.id }, 'resuming a push interrupted by a restart');
    } catch (err) {
      s.logger.error({ err, transfer: t.id }, 'cannot resume push');
    }
  }
}

/** Checks the target, opens the download session and starts sending in the background. */
export async function startPush(
  s: PushDeps,
  req: PushRequest,
): Promise<{ transfer: Transfer; token: string }> {
  if (req.direction !== 'download') {
    throw new ApiError(
      'INVALID_REQUEST',
      'target_url makes diskport send the VDI to another diskport: open it with direction "download"',
    );
  }
  const ref = parseTargetUrl(req.target_url);
  const target = await new FetchGuard(s.config.allowFetch).check(req.target_url, 'target_url');
  // The receiver's URL, token included, stays private on the session (never in
  // its JSON): it is what lets a push resume after this diskport restarts.
  // Sealed with the service's token when it has one (secrets.ts).
  const kept = s.config.token ? sealSecret(req.target_url, s.config.token) : req.target_url;
  const opened = await s.transfers.create({ ...req, target_url: redact(target.url) }, { push_target: kept });
  const id = opened.transfer.id;
  s.transfers.runJob(id, (task) =>
    new Push(s, id, opened.transfer, receiverOf(target, ref, task.signal), task).run(),
  );
  return opened;
}

/** `{base}/v1/transfers/{id}/data?token=...`: the receiver's base path, transfer id and token. */
export function parseTargetUrl(raw: string): { prefix: string; id: string; token: string } {
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw new ApiError('INVALID_URL', `target_url is not a URL: '${raw}'`, { field: 'target_url' });
  }
  const m = /^(.*)\/v1\/transfers\/([^/]+)\/data$/.exec(url.pathname);
  const token = url.searchParams.get('token');
  if (!m || !token) {
    throw new ApiError(
      'INVALID_URL',
      "target_url must be the `url` of an upload transfer opened on the receiving diskport: '.../v1/transfers/{id}/data?token=...'",
      { field: 'target_url' },
    );
  }
  if (/\/\/|\\/.test(m[1])) {
    throw new ApiError('INVALID_URL', 'target_url has an empty or backslashed path segment', {
      field: 'target_url',
    });
  }
  return { prefix: m[1], id: decodeURIComponent(m[2]), token };
}

/**
 * The receiving transfer, spoken to with its own token only, through an agent
 * pinned to the address the fetch guard checked.
 */
export function receiverOf(
  target: FetchTarget,
  ref: { prefix: string; id: string; token: string },
  signal: AbortSignal,
): { remote: TransferSession; close: () => Promise<void> } {
  const agent = pinnedAgent(target);
  const base = new URL(target.url);
  base.pathname = ref.prefix || '/';
  base.search = '';
  return {
    remote: new TransferSession({ base, dispatcher: agent, signal }, { id: ref.id, token: ref.token }),
    close: () => agent.close(),
  };
}

/** The disk in the wire format: its size, where its data is, and the bytes of any range. */
interface Source {
  size: number;
  data: ByteRange[];
  zeros: ByteRange[];
  read(start: number, end: number): Promise<Buffer>;
  /** The bytes of [start, end) as they are read (one read ahead): a serialized stream is sent so. */
  stream?: (start: number, end: number) => AsyncIterable<Buffer>;
  close(): Promise<void>;
}

async function openSource(s: PushDeps, vdiId: string, format: string, base?: string): Promise<Source> {
  if (format === 'raw' && base === undefined) {
    // The raw stream is the disk itself: its extents say where the data is.
    const image = await s.vdis.openImage(s.vdis.get(vdiId));
    try {
      const extents = await image.extents();
      const ranges = (zero: boolean) =>
        extents.filter((e) => e.zero === zero).map((e): ByteRange => [e.start, e.start + e.length]);
      return {
        size: image.virtualSize,
        data: ranges(false),
        zeros: ranges(true),
        read: (start, end) => image.read(start, end - start),
        close: () => image.close(),
      };
    } catch (err) {
      await image.close();
      throw err;
    }
  }
  // A delta (vhd, qcow2 over `base`) is compact already: only the changed blocks are in it.
  const exp = await openExport(s.vdis, vdiId, format, base);
  return {
    size: exp.size,
    data: exp.size > 0 ? [[0, exp.size]] : [],
    zeros: [],
    async read(start, end) {
      const parts: Buffer[] = [];
      for await (const part of exp.read(start, end)) parts.push(part);
      return Buffer.concat(parts);
    },
    // Each part is a buffer of its own (none is handed back for reuse): the socket may hold it.
    stream: (start, end) => exp.read(start, end),
    close: () => exp.close(),
  };
}

export class Push {
  private bytesSent = 0;
  private bytesZeroed = 0;
  /** A chunk whose PUT failed: the receiver may have kept part of it, which did cross the wire. */
  private failedPutBytes = 0;
  private retries = 0;
  /** What the receiver held at the last look, and whether that look found more than the one before. */
  private held = 0;
  private heldGrew = false;
  /** Milliseconds per phase of the last pass, for the log. */
  private readonly phases: { open_ms?: number; send_ms?: number; commit_ms?: number } = {};
  /** The receiver's finished import task, once it committed (null when only its session's state told). */
  committed: TaskJson | null = null;

  constructor(
    private readonly s: PushDeps,
    private readonly id: string,
    private readonly t: Transfer,
    private readonly receiver: { remote: TransferSession; close: () => Promise<void> },
    private readonly task: RunningTask,
    /** A delta push: the local snapshot the receiver's base holds; only what changed since is sent. */
    private readonly base?: string,
    /**
     * The receiver's session as its opening answered, when this push has just
     * opened it: the first pass takes it instead of asking again.
     */
    private opened?: TransferJson,
  ) {
    this.remote = receiver.remote;
  }

  private readonly remote: TransferSession;

  async run(): Promise<Record<string, unknown>> {
    const { signal } = this.task;
    const log = this.s.logger.child({ transfer: this.id, remote_transfer: this.remote.id });
    const started = performance.now();
    const src = await openSource(this.s, this.t.vdi_id, this.t.format, this.base);
    this.phases.open_ms = Math.round(performance.now() - started);
    try {
      this.task.setTotal(src.size);
      let failures = 0;
      let fillRounds = 0;
      let lastError: unknown = null;
      for (;;) {
        signal.throwIfAborted();
        const progressBefore = this.bytesSent + this.bytesZeroed;
        try {
          const remoteTask = await this.pass(src);
          // Where the time went: opening the source (a delta's changed blocks and layout), sending, the receiver's commit.
          log.info({ ...this.phases, bytes: src.size }, 'push sent and committed');
          return {
            remote_transfer: this.remote.id,
            remote_task: remoteTask.id || null,
            bytes_sent: this.bytesSent,
            bytes_zeroed: this.bytesZeroed,
            retries: this.retries,
          };
        } catch (err) {
          if (signal.aborted) throw signal.reason;
          if (
            err instanceof HttpError &&
            err.code === 'TRANSFER_INCOMPLETE' &&
            ++fillRounds <= MAX_FILL_ROUNDS
          ) {
            continue;
          }
          if (err instanceof ApiError) throw err;
          if (!isTransient(err)) throw err instanceof HttpError ? refused(err) : err;
          lastError = err;
        }
        // A streamed PUT cut part way moved bytes the receiver kept: progress, seen at the next look.
        const heldMore = this.heldGrew;
        this.heldGrew = false;
        if (this.bytesSent + this.bytesZeroed > progressBefore || heldMore) failures = 0;
        else if (++failures > SERVER_RETRY.retries) {
          throw new ApiError(
            'REMOTE_UNAVAILABLE',
            `the receiver kept failing: ${SERVER_RETRY.retries + 1} attempts in a row moved no byte (last: ${describe(lastError)}); ` +
              'its session stays open: push again to complete it',
          );
        }
        this.retries++;
        log.info({ failures, err: describe(lastError) }, 'push interrupted: asking the receiver what it has');
        await backoff(SERVER_RETRY, Math.max(1, failures), signal);
      }
    } finally {
      await src.close().catch(() => {});
      await this.receiver.close().catch(() => {});
    }
  }

  /** Sends what the receiver misses, then finalizes it; resolves with its finished task. */
  private async pass(src: Source): Promise<TaskJson> {
    const st = this.opened ?? (await this.remote.state());
    this.opened = undefined;
    if (st.state === 'open') {
      this.checkReceiver(st, src);
      const sending = performance.now();
      const have = new RangeSet(st.received);
      if (have.size() > this.held) {
        this.heldGrew = true;
        this.held = have.size();
      }
      this.setDone(have.size());
      if (st.size === null && src.data.length === 0) await this.remote.declareTotal(src.size);
      for (const [a, b] of src.data) {
        for (const [ma, mb] of have.missing(a, b)) {
          if (src.stream) {
            await this.sendStream(src, src.stream, ma, mb);
            continue;
          }
          for (let pos = ma; pos < mb; pos += CHUNK_BYTES) {
            const end = Math.min(mb, pos + CHUNK_BYTES);
            const buf = await src.read(pos, end);
            // Allocated but zero (a raw disk's written zeros): as cheap as a hole.
            if (this.t.format === 'raw' && isZero(buf)) {
              await this.remote.zero(pos, end);
              this.bytesZeroed += end - pos;
              this.task.markCovered(end - pos);
            } else {
              try {
                await this.remote.put(pos, buf, src.size);
              } catch (err) {
                this.failedPutBytes += buf.length;
                throw err;
              }
              this.bytesSent += buf.length;
            }
            this.task.addBytes(end - pos);
            this.s.transfers.renew(this.id);
          }
        }
      }
      for (const [a, b] of src.zeros) {
        for (const [ma, mb] of have.missing(a, b)) {
          await this.remote.zero(ma, mb);
          this.bytesZeroed += mb - ma;
          this.task.markCovered(mb - ma);
          this.task.addBytes(mb - ma);
        }
      }
      this.s.transfers.renew(this.id);
      this.phases.send_ms = Math.round(performance.now() - sending);
    } else if (st.state !== 'finalizing' && st.state !== 'committed') {
      throw new ApiError(
        'REMOTE_TRANSFER_ENDED',
        `the receiving transfer ${this.remote.id} is ${st.state}; open a new one there and push again`,
        { state: st.state },
      );
    }
    const committing = performance.now();
    const task = await this.commit();
    this.phases.commit_ms = Math.round(performance.now() - committing);
    this.committed = task.id ? task : null;
    return task;
  }

  /**
   * [start, end) of the stream in one PUT. Progress moves as the bytes go
   * out; if the request fails they are taken back, the receiver's answer to
   * the next look saying what it kept (setDone).
   */
  private async sendStream(
    src: Source,
    stream: NonNullable<Source['stream']>,
    start: number,
    end: number,
  ): Promise<void> {
    let streamed = 0;
    let unrenewed = 0;
    const task = this.task;
    const renew = () => this.s.transfers.renew(this.id);
    async function* body(): AsyncGenerator<Buffer> {
      for await (const part of stream(start, end)) {
        yield part;
        streamed += part.length;
        unrenewed += part.length;
        task.addBytes(part.length);
        if (unrenewed >= RENEW_EVERY_BYTES) {
          unrenewed = 0;
          renew();
        }
      }
    }
    try {
      await this.remote.putStream(start, end - start, body(), src.size);
    } catch (err) {
      task.addBytes(-streamed);
      this.failedPutBytes += streamed;
      throw err;
    }
    this.bytesSent += end - start;
    renew();
  }

  private checkReceiver(st: TransferJson, src: Source): void {
    if (st.direction !== 'upload') {
      throw new ApiError(
        'REMOTE_NOT_UPLOAD',
        `the receiving transfer ${this.remote.id} is a download; push needs an upload`,
      );
    }
    if (st.format !== this.t.format) {
      throw new ApiError(
        'FORMAT_MISMATCH',
        `the receiving transfer takes ${st.format}, this push sends ${this.t.format}; use the same format on both sides`,
        { remote: st.format, local: this.t.format },
      );
    }
    if (st.size !== null && st.size !== src.size) {
      throw new ApiError(
        'CONFLICTING_LENGTH',
        `the receiving transfer expects ${st.size} bytes, this disk in ${this.t.format} is ${src.size} bytes`,
        { remote: st.size, local: src.size },
      );
    }
  }

  /** Finalizes the receiver and waits (long-polls) for its commit. */
  private async commit(): Promise<TaskJson> {
    for (;;) {
      // Waiting on the receiver is activity: the local session must not expire meanwhile.
      this.s.transfers.renew(this.id);
      let task: TaskJson;
      try {
        task = await this.remote.finalize(FINALIZE_WAIT_SECONDS);
      } catch (err) {
        if (!(err instanceof HttpError && err.code === 'TRANSFER_NOT_ACTIVE')) throw err;
        // The session ended between two polls: its state says how.
        const st = await this.remote.state();
        if (st.state === 'committed')
          return { id: '', status: 'success', progress: 1, error: null, result: null };
        throw new ApiError(
          'REMOTE_IMPORT_FAILED',
          `the receiving transfer ${this.remote.id} ended ${st.state}; the local VDI is unaffected`,
          { state: st.state },
        );
      }
      if (task.status === 'success') return task;
      if (task.status === 'failure' || task.status === 'cancelled') {
        throw new ApiError(
          'REMOTE_IMPORT_FAILED',
          `the receiver's import ${task.status === 'cancelled' ? 'was cancelled' : 'failed'}: ${task.error?.code ?? ''} ${task.error?.message ?? ''}`.trim(),
          { remote_task: task.id, remote_error: task.error },
        );
      }
    }
  }

  /**
   * Progress as far as the receiver has the disk. What it holds beyond what
   * was counted came from a PUT that failed part way (sent now), or was
   * there already (not sent now: progress, not bytes moved).
   */
  private setDone(bytes: number): void {
    const jump = bytes - this.task.record.bytes_done;
    const fromFailedPuts = Math.min(Math.max(0, jump), this.failedPutBytes);
    this.failedPutBytes = 0;
    this.task.markCovered(jump - fromFailedPuts);
    this.task.addBytes(jump);
  }
}

/** A receiver's definitive refusal, as the local task's error. */
function refused(err: HttpError): ApiError {
  return new ApiError('REMOTE_REJECTED', `the receiver answered ${err.status} ${err.code}: ${err.message}`, {
    remote_status: err.status,
    remote_code: err.code,
  });
}
