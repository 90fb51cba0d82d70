/**
 * Push to a VDI of another diskport, incrementally:
 * `POST /v1/vdis/{id}/push {target: {server, vdi, token?}, incremental: true}`.
 *
 * This side opens the receiver's upload session itself, with the target's
 * management token (`target.token`; none when that server runs without
 * one), then sends as push.ts does (ranged chunks, resumed from what the
 * receiver holds after a broken link or a restart of either side).
 *
 * - The first incremental push is full: the source is snapshotted, that
 *   snapshot is sent as raw (only its data; holes are zero ops), and the
 *   receiver's session snapshots the target in the commit's own transaction
 *   (`snapshot_after_commit`). The two snapshots hold the same disk: they
 *   are remembered as a pair (push-pairs.ts).
 * - Each later one snapshots the source again and sends the qcow2 delta
 *   between the pair's source snapshot and the new one (changed 64 KiB
 *   blocks only; blocks that became zeros are zero clusters, no data) to a
 *   session opened with `base` = the pair's target snapshot, which the
 *   receiver checks at open and at commit (409 BASE_MISMATCH otherwise).
 * - When the receiver refuses that base (the target changed since, or its
 *   snapshot is gone) or the source's snapshot is gone, the push is full,
 *   and its task says why (`fallback`): never a delta onto a wrong base.
 * - Once committed, the new pair replaces the old one, whose two snapshots
 *   are deleted: each side keeps one snapshot per pair.
 *
 * Without `incremental`, the live VDI is sent as a plain full push: no
 * snapshot on either side, nothing remembered.
 */
import { ApiError } from '../errors.js';
import { openSecret, sealSecret } from '../secrets.js';
import type { Db } from '../storage/db.js';
import type { Snapshots } from '../storage/snapshots.js';
import type { Vdi } from '../storage/vdis.js';
import type { RunningTask, TaskManager } from '../tasks/task-manager.js';
import type { Task } from '../tasks/task-store.js';
import { FetchGuard, type FetchTarget, pinnedAgent } from './fetch-guard.js';
import { redact } from './pull.js';
import { Push, type PushDeps, parseTargetUrl, receiverOf } from './push.js';
import { type PendingPush, PushPairs, targetKey } from './push-pairs.js';
import { describe, HttpError } from './retry-policy.js';
import {
  callJson,
  type Endpoint,
  openTransfer,
  send,
  type TaskJson,
  type TransferJson,
  urlOf,
} from './transfer-client.js';
import type { Transfer } from './transfer-store.js';

export interface VdiPushRequest {
  target: { server: string; vdi: string; token?: string };
  incremental?: boolean;
  ttl_seconds?: number;
}

export interface IncrementalPushDeps extends PushDeps {
  db: Db;
  snapshots: Snapshots;
  tasks: TaskManager;
}

/** The receiver's session JSON, with what snapshot_after_commit adds. */
interface ReceiverJson extends TransferJson {
  snapshot?: string | null;
}

/** The target VDI as its server describes it. */
interface RemoteVdi {
  id: string;
  virtual_size: number;
  is_snapshot?: boolean;
}

/** Checks the request and the target, opens both sessions, and starts sending in the background. */
export async function startVdiPush(
  s: IncrementalPushDeps,
  vdiId: string,
  req: VdiPushRequest,
): Promise<Task> {
  const source = s.vdis.get(vdiId);
  const incremental = req.incremental === true;
  if (incremental && source.is_snapshot) {
    throw new ApiError(
      'VDI_IS_SNAPSHOT',
      `VDI ${vdiId} is a snapshot: it never changes, so there is nothing to push incrementally; push it without incremental`,
      { vdi: vdiId },
    );
  }
  const guarded = await new FetchGuard(s.config.allowFetch).check(req.target.server, 'target.server');
  const server = guarded.url;
  const key = targetKey(server, req.target.vdi);
  const ep = endpointOf(guarded, req.target.token);
  const pairs = new PushPairs(s.db);
  try {
    const remote = await remoteVdi(ep, req.target.vdi);
    if (remote.virtual_size !== source.virtual_size) {
      throw new ApiError(
        'CONFLICTING_LENGTH',
        `target VDI ${remote.id} is ${remote.virtual_size} bytes, VDI ${vdiId} is ${source.virtual_size}: ` +
          'resize the target (PATCH virtual_size there) to the same size, then push again',
        { remote: remote.virtual_size, local: source.virtual_size },
      );
    }
    const pair = incremental ? pairs.get(vdiId, key) : null;
    if (pair?.pending) await clearPending(s, pairs, vdiId, key, pair.pending);

    const snapshot = incremental
      ? await s.snapshots.snapshot(vdiId, { name_label: `pushed to ${redact(server)} ${req.target.vdi}` })
      : null;
    try {
      const opened = await openReceiver(s, ep, req, pair, snapshot);
      // The data URL is built here, on the server this push checked, not taken from the answer.
      const url = urlOf(ep, `/v1/transfers/${encodeURIComponent(opened.receiver.id)}/data`, {
        token: opened.token,
      }).href;
      const kept = s.config.token ? sealSecret(url, s.config.token) : url;
      const local = await s.transfers.create(
        {
          vdi: snapshot?.id ?? vdiId,
          direction: 'download',
          format: opened.format,
          target_url: redact(new URL(url)),
          ttl_seconds: req.ttl_seconds,
        },
        { push_target: kept },
      );
      const pending: PendingPush | null = snapshot && {
        transfer: local.transfer.id,
        snapshot: snapshot.id,
        base: opened.base?.source ?? null,
        target_base: opened.base?.target ?? null,
        fallback: opened.fallback,
        retire: { source: pair?.source_snapshot ?? null, target: pair?.target_snapshot ?? null },
        token: req.target.token ? seal(s, req.target.token) : null,
      };
      if (pending) pairs.begin(vdiId, key, pending);
      const target = await new FetchGuard(s.config.allowFetch).check(url, 'target.server');
      start(s, local.transfer, target, url, pending && { sourceVdi: vdiId, key, pending }, opened.receiver);
      return s.tasks.get(local.transfer.task_id);
    } catch (err) {
      if (snapshot) await deleteQuietly(s, snapshot.id);
      throw err;
    }
  } finally {
    await (ep.dispatcher as { close(): Promise<void> }).close().catch(() => {});
  }
}

/**
 * Startup: incremental pushes a restart cut short go on from what their
 * receiver holds; one whose local session ended leaves nothing behind.
 * Returns the sessions it owns, which push.ts's resume leaves alone.
 */
export async function resumeIncrementalPushes(
  s: IncrementalPushDeps,
  /** Only these (a dead node's, just taken over; the others are live nodes' or this one's). */
  only?: (t: Transfer) => boolean,
): Promise<Set<string>> {
  const pairs = new PushPairs(s.db);
  const owned = new Set<string>();
  for (const pair of pairs.pending()) {
    const pending = pair.pending!;
    owned.add(pending.transfer);
    let t: Transfer | null = null;
    try {
      t = s.transfers.get(pending.transfer);
    } catch {
      // never created: nothing to resume
    }
    try {
      // Another live node's push: that node runs it.
      if (only && !(t && only(t))) continue;
      if (t?.state === 'open' && !s.transfers.activeSession(t.id)) continue;
      if (t?.state !== 'open' || !t.push_target) {
        await clearPending(s, pairs, pair.source_vdi, pair.target, pending);
        continue;
      }
      const url = openSecret(t.push_target, s.config.token);
      const target = await new FetchGuard(s.config.allowFetch).check(url, 'target.server');
      start(s, t, target, url, { sourceVdi: pair.source_vdi, key: pair.target, pending });
      s.logger.info({ transfer: t.id }, 'resuming an incremental push interrupted by a restart');
    } catch (err) {
      s.logger.error({ err, transfer: pending.transfer }, 'cannot resume incremental push');
    }
  }
  return owned;
}

type Owned = { sourceVdi: string; key: string; pending: PendingPush };

function start(
  s: IncrementalPushDeps,
  t: Transfer,
  target: FetchTarget,
  url: string,
  owned: Owned | null,
  /** The receiver's session as this push just opened it (none on a resume: asked anew). */
  opened?: TransferJson,
): void {
  const ref = parseTargetUrl(url);
  s.transfers.runJob(t.id, async (task: RunningTask) => {
    const push = new Push(
      s,
      t.id,
      t,
      receiverOf(target, ref, task.signal),
      task,
      owned?.pending.base ?? undefined,
      opened,
    );
    let result: Record<string, unknown>;
    try {
      result = await push.run();
    } catch (err) {
      // This push opened the receiver's session: ending it frees the target VDI for the next push.
      // One that committed all the same (its answer lost) is a push that arrived.
      if ((await endReceiver(target, ref)) === 'committed' && owned) {
        const settled = await settle(s, target, ref, owned);
        const note = `the push's last call failed (${describe(err)}), but the receiver had committed`;
        return { incremental: true, ...settled, notes: [note, ...((settled.notes as string[]) ?? [])] };
      }
      // Its snapshot is read by this session until it ends: the next push of the pair (or a restart) deletes it.
      throw err;
    }
    if (!owned) return { ...result, incremental: false };
    const settling = performance.now();
    const settled = await settle(s, target, ref, owned, snapshotOf(push.committed));
    s.logger.info(
      { transfer: t.id, settle_ms: Math.round(performance.now() - settling) },
      'incremental push settled: the new pair kept, the previous one deleted',
    );
    return { ...result, ...settled };
  });
}

/**
 * After the receiver committed: the new pair is remembered and the previous
 * one's snapshots are deleted on both sides (a failure there is logged and
 * said, never a failed push: the disk arrived).
 */
async function settle(
  s: IncrementalPushDeps,
  target: FetchTarget,
  ref: ReturnType<typeof parseTargetUrl>,
  { sourceVdi, key, pending }: Owned,
  /** The receiver's snapshot as its import task's result named it; else its session is asked. */
  known?: string,
): Promise<Record<string, unknown>> {
  let targetSnapshot: string | null = known ?? null;
  if (known === undefined) {
    const receiver = receiverOf(target, ref, AbortSignal.timeout(60_000));
    try {
      targetSnapshot = ((await receiver.remote.state()) as ReceiverJson).snapshot ?? null;
    } finally {
      await receiver.close().catch(() => {});
    }
  }
  const pairs = new PushPairs(s.db);
  pairs.commit(sourceVdi, key, targetSnapshot ? { source: pending.snapshot, target: targetSnapshot } : null);
  const notes: string[] = [];
  if (!targetSnapshot) {
    notes.push('the receiver made no snapshot of what it committed: the next push will be full');
    await deleteQuietly(s, pending.snapshot);
  }
  // The previous pair's two snapshots go at once: neither waits for the other side.
  const [sourceDeleted, targetWhy] = await Promise.all([
    pending.retire.source && pending.retire.source !== pending.snapshot
      ? deleteQuietly(s, pending.retire.source)
      : true,
    pending.retire.target && pending.retire.target !== targetSnapshot
      ? deleteRemote(s, target, ref, pending.retire.target, pending.token)
      : null,
  ]);
  if (!sourceDeleted) notes.push(`source snapshot ${pending.retire.source} could not be deleted`);
  if (targetWhy) notes.push(`target snapshot ${pending.retire.target} could not be deleted: ${targetWhy}`);
  return {
    incremental: true,
    mode: pending.base ? 'delta' : 'full',
    fallback: pending.fallback,
    base: pending.base,
    target_base: pending.target_base,
    source_snapshot: targetSnapshot ? pending.snapshot : null,
    target_snapshot: targetSnapshot,
    ...(notes.length > 0 && { notes }),
  };
}

/** The snapshot a receiver's import task names in its result (snapshot_after_commit), if it does. */
function snapshotOf(task: TaskJson | null): string | undefined {
  const snapshot = (task?.result as { snapshot?: unknown } | null)?.snapshot;
  return typeof snapshot === 'string' ? snapshot : undefined;
}

/**
 * Opens the receiver's session: a delta over the pair's target snapshot
 * when the pair holds (and the receiver agrees), else a full raw upload.
 */
async function openReceiver(
  s: IncrementalPushDeps,
  ep: Endpoint,
  req: VdiPushRequest,
  pair: { source_snapshot: string | null; target_snapshot: string | null } | null,
  snapshot: Vdi | null,
): Promise<{
  receiver: ReceiverJson;
  token: string;
  format: string;
  base: { source: string; target: string } | null;
  fallback: string | null;
}> {
  const common = { vdi: req.target.vdi, direction: 'upload', ttl_seconds: req.ttl_seconds };
  let fallback: string | null = null;
  if (snapshot && pair?.source_snapshot && pair.target_snapshot) {
    if (!exists(s, pair.source_snapshot)) {
      fallback = `the source's snapshot ${pair.source_snapshot} of the last push is gone`;
    } else {
      try {
        const { transfer, session } = await openTransfer(ep, {
          ...common,
          format: 'qcow2',
          base: pair.target_snapshot,
          snapshot_after_commit: true,
        });
        return {
          receiver: transfer as ReceiverJson,
          token: session.ref.token,
          format: 'qcow2',
          base: { source: pair.source_snapshot, target: pair.target_snapshot },
          fallback: null,
        };
      } catch (err) {
        if (
          !(err instanceof HttpError) ||
          !['BASE_MISMATCH', 'VDI_NOT_FOUND', 'INVALID_REQUEST'].includes(err.code)
        ) {
          throw remoteError(err, 'the delta upload session', ep);
        }
        fallback =
          err.code === 'BASE_MISMATCH'
            ? `the target changed since snapshot ${pair.target_snapshot} (${err.message})`
            : `the target's snapshot ${pair.target_snapshot} of the last push is unusable (${err.code}: ${err.message})`;
      }
    }
  }
  try {
    const { transfer, session } = await openTransfer(ep, {
      ...common,
      format: 'raw',
      ...(snapshot && { snapshot_after_commit: true }),
    });
    return {
      receiver: transfer as ReceiverJson,
      token: session.ref.token,
      format: 'raw',
      base: null,
      fallback,
    };
  } catch (err) {
    throw remoteError(err, 'the upload session', ep);
  }
}

async function remoteVdi(ep: Endpoint, vdi: string): Promise<RemoteVdi> {
  try {
    return await callJson<RemoteVdi>(ep, {
      method: 'GET',
      path: `/v1/vdis/${encodeURIComponent(vdi)}`,
      management: true,
      timeoutMs: 30_000,
    });
  } catch (err) {
    if (err instanceof HttpError && err.status === 404) {
      throw new ApiError(
        'REMOTE_VDI_NOT_FOUND',
        `${ep.base.href} has no VDI ${vdi}: create it there (POST /v1/vdis, the source's virtual_size) and name it as target.vdi`,
        { server: redact(ep.base), vdi },
      );
    }
    throw remoteError(err, `VDI ${vdi}`, ep);
  }
}

/** A failed call to the target, as the push's error: refused (with why), or unreachable. */
function remoteError(err: unknown, what: string, ep: Endpoint): ApiError {
  if (err instanceof ApiError) return err;
  const server = redact(ep.base);
  if (err instanceof HttpError) {
    const auth =
      err.status === 401 || err.status === 403
        ? ep.token
          ? ': target.token is not its management token'
          : ': it needs its management token as target.token'
        : '';
    return new ApiError(
      'REMOTE_REJECTED',
      `${server} refused ${what} with ${err.status} ${err.code}: ${err.message}${auth}`,
      { remote_status: err.status, remote_code: err.code, server },
    );
  }
  return new ApiError('REMOTE_UNAVAILABLE', `${server} could not be reached for ${what}: ${describe(err)}`, {
    server,
  });
}

function endpointOf(target: FetchTarget, token: string | undefined): Endpoint {
  return { base: target.url, dispatcher: pinnedAgent(target), ...(token && { token }) };
}

/** A push that will not go on: its snapshot goes, the pair stays as it was. */
async function clearPending(
  s: IncrementalPushDeps,
  pairs: PushPairs,
  sourceVdi: string,
  key: string,
  pending: PendingPush,
): Promise<void> {
  let active = false;
  try {
    active = ['open', 'finalizing'].includes(s.transfers.get(pending.transfer).state);
  } catch {
    // no such session
  }
  if (active) {
    throw new ApiError(
      'PUSH_IN_PROGRESS',
      `a push of VDI ${sourceVdi} to this target is under way (transfer ${pending.transfer}); wait for its task, or cancel it`,
      { transfer: pending.transfer },
    );
  }
  const pair = pairs.get(sourceVdi, key);
  if (pending.snapshot !== pair?.source_snapshot) await deleteQuietly(s, pending.snapshot);
  pairs.abandon(sourceVdi, key);
}

function exists(s: IncrementalPushDeps, id: string): boolean {
  try {
    return s.vdis.get(id).is_snapshot === 1;
  } catch {
    return false;
  }
}

/** Deletes a local snapshot; false (logged) when it cannot be. */
async function deleteQuietly(s: IncrementalPushDeps, id: string): Promise<boolean> {
  try {
    if (!exists(s, id)) return true;
    // Someone reads it through a session of their own: it stays (the DELETE route would refuse too).
    if (s.transfers.activeOn(id).length > 0) return false;
    await s.vdis.delete(id);
    return true;
  } catch (err) {
    s.logger.warn({ err, vdi: id }, 'could not delete a snapshot an incremental push made');
    return false;
  }
}

/** Deletes a snapshot on the target; the reason it could not, or null. */
async function deleteRemote(
  s: IncrementalPushDeps,
  target: FetchTarget,
  ref: ReturnType<typeof parseTargetUrl>,
  id: string,
  sealed: string | null,
): Promise<string | null> {
  const base = new URL(target.url);
  base.pathname = ref.prefix || '/';
  base.search = '';
  const token = sealed ? openSecret(sealed, s.config.token) : undefined;
  const ep: Endpoint = { base, dispatcher: pinnedAgent(target), ...(token && { token }) };
  try {
    const res = await send(ep, {
      method: 'DELETE',
      path: `/v1/vdis/${encodeURIComponent(id)}`,
      management: true,
      timeoutMs: 60_000,
    });
    await res.body.dump();
    return null;
  } catch (err) {
    if (err instanceof HttpError && err.status === 404) return null;
    s.logger.warn({ err, vdi: id }, "could not delete the target's previous push snapshot");
    return describe(err);
  } finally {
    await (ep.dispatcher as { close(): Promise<void> }).close().catch(() => {});
  }
}

/**
 * Cancels the receiver's session unless it committed; answers its state
 * (null when unreachable: its session then expires by itself).
 */
async function endReceiver(
  target: FetchTarget,
  ref: ReturnType<typeof parseTargetUrl>,
): Promise<string | null> {
  const receiver = receiverOf(target, ref, AbortSignal.timeout(10_000));
  try {
    const { state } = await receiver.remote.state();
    if (state === 'open') await receiver.remote.cancel({ timeoutMs: 10_000 });
    return state;
  } catch {
    return null;
  } finally {
    await receiver.close().catch(() => {});
  }
}

function seal(s: IncrementalPushDeps, secret: string): string {
  return s.config.token ? sealSecret(secret, s.config.token) : secret;
}
