/**
 * Pull (Glance web-download, CloudStack template registration):
 * `POST /v1/transfers {vdi, direction: "upload", format, source_url, checksum?}`
 * opens an upload session and diskport fetches the image into it itself, as
 * the session's task (progress: bytes received / Content-Length).
 *
 * A dropped connection resumes where the session's Upload-Offset stands, with
 * `Range: bytes=N-` and `If-Range: <ETag or Last-Modified>`, after an
 * exponential backoff; attempts that bring no byte are bounded (retry-policy.ts, SERVER_RETRY).
 * A source that changed meanwhile (another validator, or 200 where 206 was
 * asked for) restarts cleanly from 0: the session forgets what it had. At the
 * end the session is finalized, which verifies the checksum, validates and
 * commits; any failure leaves the VDI as it was.
 *
 * Redirects are followed (at most MAX_REDIRECTS), each hop through the SSRF
 * guard again. Every attempt starts from the URL the client gave, since
 * redirect targets are often short-lived (presigned URLs).
 */
import type { Logger } from 'pino';
import type { Agent, Dispatcher } from 'undici';
import type { Config } from '../config.js';
import { ApiError, formatBytes } from '../errors.js';
import { openSecret, sealSecret } from '../secrets.js';
import type { RunningTask } from '../tasks/task-manager.js';
import { FetchGuard, type FetchTarget, pinnedAgent } from './fetch-guard.js';
import { backoff, describe, isTransientStatus, SERVER_RETRY } from './retry-policy.js';
import type { ChunkWrite, CreateTransfer, TransferService } from './sessions.js';
import type { Transfer } from './transfer-store.js';
import { undici } from './undici.js';

const MAX_REDIRECTS = 5;
/** Times the source may change under a pull before it fails with SOURCE_CHANGED. */
const MAX_RESTARTS = 3;
const REDIRECT_STATUSES = new Set([301, 302, 303, 307, 308]);

export type PullRequest = CreateTransfer & { source_url: string };

/** What a pull uses: the sessions it lands in, the log, the fetch allow-list, and the token that seals the URL it keeps. */
export interface PullDeps {
  transfers: TransferService;
  logger: Logger;
  config: Pick<Config, 'allowFetch' | 'token'>;
}

/** A failure worth another attempt (a 5xx, a source that stopped short). */
class RetryableError extends Error {}

/** Opens the upload session and starts fetching in the background; answers once the session exists. */
export async function startPull(
  s: PullDeps,
  req: PullRequest,
): Promise<{ transfer: Transfer; token: string }> {
  if (req.direction !== 'upload') {
    throw new ApiError(
      'INVALID_REQUEST',
      'source_url makes diskport fetch an image into the VDI: open it with direction "upload"',
    );
  }
  const guard = new FetchGuard(s.config.allowFetch);
  const source = await guard.check(req.source_url, 'source_url');
  // The source's URL may carry its credential (a presigned URL, a session
  // token): it stays private on the session so the pull resumes after a
  // restart, sealed with the service's token when it has one (secrets.ts).
  const kept = s.config.token ? sealSecret(source.url.href, s.config.token) : source.url.href;
  const opened = await s.transfers.create({ ...req, source_url: kept });
  const id = opened.transfer.id;
  s.transfers.runJob(id, (task) => new Pull(s, id, guard, source, req.size ?? null, task).run());
  return opened;
}

/**
 * Startup: pulls whose session survived a restart go on from the bytes
 * already received, with the validator they had (If-Range keeps them safe).
 */
export async function resumePulls(s: PullDeps, only: (t: Transfer) => boolean = () => true): Promise<void> {
  for (const t of s.transfers.list({ active: true })) {
    if (t.direction !== 'upload' || t.state !== 'open' || !t.source_url || !only(t)) continue;
    // Another live node's pull: that node runs it.
    if (!s.transfers.activeSession(t.id)) continue;
    // Nothing can reach the source without it: the pull ends, and the VDI stays as it was.
    const url = openKeptUrl(s, t.id, t.source_url, "the pull cannot resume: its source's URL", 'the pull');
    if (url === null) continue;
    try {
      const guard = new FetchGuard(s.config.allowFetch);
      const source = await guard.check(url, 'source_url');
      const validator = t.source_validator;
      s.transfers.runJob(t.id, (task) => new Pull(s, t.id, guard, source, t.size, task, validator).run());
      s.logger.info({ transfer: t.id }, 'resuming a pull interrupted by a restart');
    } catch (err) {
      s.logger.error({ err, transfer: t.id }, 'cannot resume pull');
    }
  }
}

/**
 * A URL a session keeps for its resume (a pull's source, a push's receiver),
 * opened with the service's token; null when it cannot be (sealed with
 * another token, or the service now has none), the session's task then
 * ending INTERRUPTED with `what` and the cause.
 */
export function openKeptUrl(s: PullDeps, id: string, kept: string, what: string, job: string): string | null {
  try {
    return openSecret(kept, s.config.token);
  } catch (err) {
    const reason = `${what} was ${(err as Error).message}; start ${job} again`;
    s.transfers.runJob(id, async () => {
      throw new ApiError('INTERRUPTED', reason);
    });
    s.logger.error({ transfer: id }, reason);
    return null;
  }
}

class Pull {
  private readonly agents = new Map<string, Agent>();
  /** Strong ETag or Last-Modified of the representation being fetched. */
  private validator: string | null = null;
  private restarts = 0;

  constructor(
    private readonly s: PullDeps,
    private readonly id: string,
    private readonly guard: FetchGuard,
    private readonly source: FetchTarget,
    /** The size the client declared, kept across restarts. */
    private readonly declaredSize: number | null,
    private readonly task: RunningTask,
    validator: string | null = null,
  ) {
    this.validator = validator;
  }

  async run(): Promise<undefined> {
    const { signal } = this.task;
    const log = this.s.logger.child({ transfer: this.id, source: redact(this.source.url) });
    let failures = 0;
    let lastError: unknown = null;
    try {
      for (;;) {
        signal.throwIfAborted();
        const before = this.s.transfers.uploadState(this.id);
        if (before.length !== null && before.offset >= before.length) break;
        const restartsBefore = this.restarts;
        try {
          await this.attempt(before.offset, before.length);
        } catch (err) {
          if (signal.aborted) throw signal.reason;
          if (!isRetryable(err)) throw err;
          lastError = err;
        }
        const after = this.s.transfers.uploadState(this.id);
        if (after.length !== null && after.offset >= after.length) break;
        // Restarts are bounded on their own (MAX_RESTARTS).
        if (this.restarts > restartsBefore) {
          failures = 0;
          continue;
        }
        if (after.offset > before.offset) failures = 0;
        else if (++failures > SERVER_RETRY.retries) throw gaveUp(after, lastError);
        log.info(
          { offset: after.offset, length: after.length, failures, err: describe(lastError) },
          'pull interrupted: resuming',
        );
        await backoff(SERVER_RETRY, Math.max(1, failures), signal);
      }
      this.s.transfers.finalize(this.id);
      await this.s.transfers.completion(this.id);
      return undefined;
    } finally {
      await Promise.all([...this.agents.values()].map((a) => a.close().catch(() => {})));
    }
  }

  /** The source is not what it was: forget every byte received. */
  private async restart(why: string): Promise<void> {
    if (++this.restarts > MAX_RESTARTS) {
      throw new ApiError(
        'SOURCE_CHANGED',
        `the source changed ${this.restarts} times while it was being fetched (${why}); the VDI is unchanged, try again when it is stable`,
      );
    }
    this.s.logger.warn(
      { transfer: this.id, restarts: this.restarts, why },
      'source changed during the pull: starting again from 0',
    );
    this.validator = null;
    await this.s.transfers.reset(this.id, this.declaredSize);
  }

  /** One GET from `offset`; lands its body in the session. */
  private async attempt(offset: number, length: number | null): Promise<'done' | 'restart'> {
    const headers: Record<string, string> = { 'accept-encoding': 'identity', 'user-agent': 'diskport' };
    const ranged = offset > 0;
    if (ranged) {
      headers.range = `bytes=${offset}-`;
      if (this.validator) headers['if-range'] = this.validator;
    }
    const res = await this.get(headers);
    try {
      const encoding = header(res.headers, 'content-encoding');
      if (encoding && encoding !== 'identity') {
        throw new ApiError(
          'SOURCE_UNUSABLE',
          `the source sent the image with Content-Encoding ${encoding}; diskport needs the bytes themselves`,
        );
      }
      const validator = validatorOf(res.headers);
      if (res.statusCode === 200) {
        // A full answer to a Range request: the source changed (If-Range) or ignores ranges.
        if (ranged) await this.restart('200 to a Range request');
        this.validator = validator;
        // Kept on the session, so a pull resumed after a restart asks If-Range with it.
        if (validator) this.s.transfers.keepSourceValidator(this.id, validator);
        const contentLength = numberOf(header(res.headers, 'content-length'));
        if (contentLength === 0) {
          await this.s.transfers.declareTotal(this.id, 0);
          return 'done';
        }
        const chunk: ChunkWrite =
          contentLength === null ? {} : { range: { start: 0, end: contentLength - 1, total: contentLength } };
        await this.s.transfers.write(this.id, res.body, chunk);
        return 'done';
      }
      if (res.statusCode === 206) {
        const range = parseContentRange(header(res.headers, 'content-range'));
        const total = range?.total ?? length;
        if (
          !range ||
          range.start !== offset ||
          total === null ||
          (length !== null && total !== length) ||
          (this.validator !== null && validator !== null && validator !== this.validator)
        ) {
          await this.restart(`206 with Content-Range ${header(res.headers, 'content-range')}`);
          return 'restart';
        }
        await this.s.transfers.write(this.id, res.body, {
          range: { start: range.start, end: range.end, total },
        });
        return 'done';
      }
      if (res.statusCode === 416) {
        const total = parseContentRange(header(res.headers, 'content-range'))?.total ?? null;
        if (total !== null && length !== null && total !== length) {
          await this.restart(`416 for a source of ${total} bytes`);
          return 'restart';
        }
        throw new RetryableError(
          `the source refused bytes ${offset}- with 416 (it has fewer bytes than it announced)`,
        );
      }
      if (isTransientStatus(res.statusCode)) {
        throw new RetryableError(`the source answered ${res.statusCode}`);
      }
      throw new ApiError(
        'SOURCE_UNAVAILABLE',
        `the source answered ${res.statusCode} to GET ${redact(this.source.url)}; the VDI is unchanged`,
        { status: res.statusCode },
      );
    } finally {
      if (!res.body.destroyed) {
        // undici's body errors (and crashes the process, unheard) when destroyed before its end.
        res.body.on('error', () => {});
        res.body.destroy();
      }
    }
  }

  /** GET, following redirects through the guard. */
  private async get(headers: Record<string, string>): Promise<Dispatcher.ResponseData> {
    let target = this.source;
    for (let hop = 0; ; hop++) {
      const res = await undici().request(target.url, {
        method: 'GET',
        headers,
        dispatcher: this.agentFor(target),
        signal: this.task.signal,
      });
      if (!REDIRECT_STATUSES.has(res.statusCode)) return res;
      await res.body.dump();
      const location = header(res.headers, 'location');
      if (!location || hop >= MAX_REDIRECTS) {
        throw new ApiError(
          'SOURCE_UNAVAILABLE',
          location
            ? `the source redirected more than ${MAX_REDIRECTS} times`
            : `the source answered ${res.statusCode} without a Location`,
        );
      }
      target = await this.guard.check(new URL(location, target.url).href, 'source_url (redirected)');
    }
  }

  private agentFor(target: FetchTarget): Agent {
    const key = `${target.url.host}|${target.address}`;
    let agent = this.agents.get(key);
    if (!agent) {
      agent = pinnedAgent(target);
      this.agents.set(key, agent);
    }
    return agent;
  }
}

function isRetryable(err: unknown): boolean {
  if (err instanceof RetryableError) return true;
  if (err instanceof ApiError) return err.code === 'CHUNK_INCOMPLETE' || err.code === 'CLIENT_DISCONNECTED';
  // Sockets, timeouts, DNS: the network's failures, not the image's.
  return true;
}

function gaveUp(state: { offset: number; length: number | null }, lastError: unknown): ApiError {
  const last = lastError ? ` (last: ${describe(lastError)})` : '';
  if (state.length !== null && state.offset > 0) {
    return new ApiError(
      'SOURCE_INCOMPLETE',
      `the source sent ${formatBytes(state.offset)} of the ${formatBytes(state.length)} it announced, then failed ${SERVER_RETRY.retries + 1} times in a row${last}; the VDI is unchanged`,
      { received: state.offset, length: state.length },
    );
  }
  return new ApiError(
    'SOURCE_UNAVAILABLE',
    `could not fetch the source after ${SERVER_RETRY.retries + 1} attempts${last}; the VDI is unchanged`,
  );
}

/** The URL without credentials or query (presigned URLs carry secrets there), for logs and messages. */
export function redact(url: URL): string {
  return `${url.protocol}//${url.host}${url.pathname}`;
}

function header(headers: Dispatcher.ResponseData['headers'], name: string): string | undefined {
  const v = headers[name];
  return Array.isArray(v) ? v[0] : v;
}

function numberOf(value: string | undefined): number | null {
  if (value === undefined || !/^\d+$/.test(value.trim())) return null;
  const n = Number(value);
  return Number.isSafeInteger(n) ? n : null;
}

/** A strong ETag, else Last-Modified: what If-Range may carry. */
function validatorOf(headers: Dispatcher.ResponseData['headers']): string | null {
  const etag = header(headers, 'etag');
  if (etag && !etag.startsWith('W/')) return etag;
  return header(headers, 'last-modified') ?? null;
}

/** `bytes a-b/total` (total null for `*`); `bytes *\/total` gives start -1. */
function parseContentRange(
  value: string | undefined,
): { start: number; end: number; total: number | null } | null {
  if (!value) return null;
  const m = /^bytes\s+(?:(\d+)-(\d+)|\*)\/(\d+|\*)$/i.exec(value.trim());
  if (!m) return null;
  const total = m[3] === '*' ? null : Number(m[3]);
  if (m[1] === undefined) return { start: -1, end: -1, total };
  return { start: Number(m[1]), end: Number(m[2]), total };
}
