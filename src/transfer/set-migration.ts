/**
 * Migrating a disk set to another diskport (xapi's `VM.migrate_send` with
 * its VDI→SR and VDI→format maps): `POST /v1/disk-sets/{id}/migrate {dest,
 * map, delete_source}`, `dest` being the destination's receive token
 * (migration-receive.ts).
 *
 * 1. Everything is checked before a byte moves, and every problem reported
 *    together (MIGRATION_INVALID, details.problems, one entry per problem
 *    naming its disk): the destination reachable and open, each SR there,
 *    each format taken by its SR, VHD's size limit, the data fitting.
 * 2. One parent task (type `set-migrate`) and a child task per disk moved
 *    (type `migrate-disk`); the parent's result lists them from the start.
 * 3. The disks to copy are snapshotted together (one instant) and their
 *    data, sparse, written into new VDIs on the destination through write
 *    tickets (only allocated ranges cross; each round commits atomically
 *    there). Then rounds of changed blocks: a new consistent snapshot, the
 *    blocks changed since the previous one sent, until a round's delta is
 *    small (SMALL_DELTA_BYTES) or MAX_ROUNDS are done; the last snapshot is
 *    the final one, and the destination holds exactly it.
 * 4. `blank` disks get an empty VDI of the same size, `skip` disks nothing.
 * 5. The destination migration commits only when every disk has; a failure
 *    or a cancel aborts it (the destination deletes every VDI it made) and
 *    removes the snapshots taken here, so the source is as it was.
 *    `delete_source` deletes the moved VDIs (and those snapshots) only after
 *    the destination committed.
 *
 * Not resumable yet: a restart of either side fails the migration (the
 * destination aborts it when its receive token expires).
 */

import type { Logger } from 'pino';
import type { Dispatcher } from 'undici';
import { ApiError, type CancelledError } from '../errors.js';
import { isZero } from '../image/zero.js';
import { CHANGED_BLOCK_BYTES, changedBlocks } from '../ops/changed-blocks.js';
import type { DiskSets } from '../storage/disk-sets.js';
import type { Snapshots } from '../storage/snapshots.js';
import type { Vdi, VdiStore } from '../storage/vdis.js';
import type { RunningTask, TaskManager } from '../tasks/task-manager.js';
import type { Task } from '../tasks/task-store.js';
import { FetchGuard, pinnedAgent } from './fetch-guard.js';
import { decodeReceiveToken, type ReceiveToken } from './migration-receive.js';
import { undici } from './undici.js';

export type DiskMode = 'copy' | 'blank' | 'skip';

export interface DiskMapEntry {
  sr?: string;
  image_format?: string;
  mode?: DiskMode;
}

export interface SetMigrateRequest {
  dest: string;
  map?: Record<string, DiskMapEntry>;
  delete_source?: boolean;
}

export interface MigrationProblem {
  vdi: string | null;
  message: string;
}

/** Largest write in one request. */
const CHUNK_BYTES = 8 * 1024 * 1024;
/** A round that sent no more than this ends the rounds: the next snapshot would be about as small. */
export const SMALL_DELTA_BYTES = 64 * 1024 * 1024;
/** Incremental rounds after the full copy, at most (the last is the final snapshot). */
export const MAX_ROUNDS = 4;
const VHD_MAX_VIRTUAL_SIZE_BYTES = 2040 * 1024 ** 3;

interface DestSr {
  id: string;
  supported_image_formats: string[];
  default_image_format: string;
  free_space: number;
}

interface Plan {
  vdi: Vdi;
  mode: DiskMode;
  sr: string;
  format: string;
  /** Bytes of data (allocated, non-zero extents) at planning time. */
  dataBytes: number;
  task?: RunningTask;
  destVdi?: string;
}

export interface SetMigrationDeps {
  vdis: VdiStore;
  snapshots: Snapshots;
  diskSets: DiskSets;
  tasks: TaskManager;
  allowFetch: readonly string[];
  logger: Logger;
}

/** Speaks to the destination's /v1/migrations/{id} with the token's credential. */
class Destination {
  constructor(
    readonly token: ReceiveToken,
    private readonly dispatcher: Dispatcher,
  ) {}

  async call<T>(
    method: string,
    path: string,
    what: string,
    body?: unknown,
    signal?: AbortSignal,
  ): Promise<T> {
    const url = new URL(path, this.token.url).toString();
    let res: Dispatcher.ResponseData;
    try {
      res = await undici().request(url, {
        method: method as Dispatcher.HttpMethod,
        dispatcher: this.dispatcher,
        headers: {
          authorization: `Bearer ${this.token.secret}`,
          ...(body === undefined ? {} : { 'content-type': 'application/json' }),
        },
        body: body === undefined ? undefined : Buffer.isBuffer(body) ? body : JSON.stringify(body),
        signal,
      });
    } catch (err) {
      if (signal?.aborted) throw signal.reason;
      throw new ApiError(
        'REMOTE_UNAVAILABLE',
        `the destination could not be reached for ${what} (${(err as NodeJS.ErrnoException).code ?? 'connection failed'})`,
      );
    }
    const text = await res.body.text();
    if (res.statusCode >= 300) {
      let message = `HTTP ${res.statusCode}`;
      try {
        const e = JSON.parse(text).error;
        message = `${e.code}: ${e.message}`;
      } catch {
        // not a diskport error body
      }
      throw new ApiError('REMOTE_REJECTED', `the destination refused ${what}: ${message}`, {
        status: res.statusCode,
      });
    }
    return (text ? JSON.parse(text) : null) as T;
  }

  /** Writes `data` at `offset` through a ticket (imageio's PUT with a Content-Range). */
  async write(ticketPath: string, offset: number, data: Buffer, signal: AbortSignal): Promise<void> {
    const url = new URL(ticketPath, this.token.url).toString();
    await this.send(
      url,
      'PUT',
      data,
      { 'content-range': `bytes ${offset}-${offset + data.length - 1}/*` },
      signal,
    );
  }

  async zero(ticketPath: string, offset: number, size: number, signal: AbortSignal): Promise<void> {
    const url = new URL(ticketPath, this.token.url).toString();
    const body = Buffer.from(JSON.stringify({ op: 'zero', offset, size, flush: false }));
    await this.send(url, 'PATCH', body, { 'content-type': 'application/json' }, signal);
  }

  private async send(
    url: string,
    method: 'PUT' | 'PATCH',
    body: Buffer,
    headers: Record<string, string>,
    signal: AbortSignal,
  ): Promise<void> {
    let res: Dispatcher.ResponseData;
    try {
      res = await undici().request(url, { method, dispatcher: this.dispatcher, headers, body, signal });
    } catch (err) {
      if (signal.aborted) throw signal.reason;
      throw new ApiError(
        'REMOTE_UNAVAILABLE',
        `the destination could not be reached (${(err as NodeJS.ErrnoException).code ?? 'connection failed'})`,
      );
    }
    const text = await res.body.text();
    if (res.statusCode >= 300) {
      throw new ApiError(
        'REMOTE_REJECTED',
        `the destination refused a write: HTTP ${res.statusCode} ${text.slice(0, 200)}`,
        {
          status: res.statusCode,
        },
      );
    }
  }
}

export class SetMigrations {
  constructor(private readonly s: SetMigrationDeps) {}

  /** Validates everything, then starts the migration; returns the parent task. */
  async start(setId: string, req: SetMigrateRequest): Promise<Task> {
    const set = this.s.diskSets.get(setId);
    const members = this.s.diskSets.members(setId);
    const token = decodeReceiveToken(req.dest);
    const problems: MigrationProblem[] = [];
    const map = req.map ?? {};
    for (const id of Object.keys(map)) {
      if (!members.some((m) => m.id === id)) {
        problems.push({ vdi: id, message: `VDI ${id} is in the map but not a member of disk set ${set.id}` });
      }
    }
    if (members.length === 0) problems.push({ vdi: null, message: `disk set ${set.id} has no members` });

    let dest: Destination | undefined;
    let info: { state: string; sr: string | null; srs: DestSr[] } | undefined;
    try {
      const target = await new FetchGuard(this.s.allowFetch).check(token.url, 'dest');
      dest = new Destination(token, pinnedAgent(target));
      const got = await dest.call<{ state: string; sr: string | null; srs: DestSr[] }>(
        'GET',
        `/v1/migrations/${token.id}`,
        'the migration',
      );
      info = got;
      if (got.state !== 'open') {
        problems.push({
          vdi: null,
          message: `the destination's migration is ${got.state}: ask it for a new receive token`,
        });
      }
    } catch (err) {
      problems.push({ vdi: null, message: `the destination is not usable: ${(err as Error).message}` });
    }

    const plans: Plan[] = [];
    const spaceBySr = new Map<string, number>();
    for (const vdi of members) {
      const entry = map[vdi.id] ?? {};
      const mode = entry.mode ?? 'copy';
      const plan: Plan = { vdi, mode, sr: '', format: '', dataBytes: 0 };
      plans.push(plan);
      if (mode === 'skip') continue;
      if (mode === 'copy' && vdi.is_snapshot) {
        problems.push({
          vdi: vdi.id,
          message: `VDI ${vdi.id} is a snapshot; a set migration copies writable VDIs`,
        });
      }
      if (!info) continue;
      const destSrs = info.srs;
      const srId = entry.sr ?? info.sr ?? 'local';
      const sr = destSrs.find((x) => x.id === srId);
      if (!sr) {
        problems.push({
          vdi: vdi.id,
          message: `the destination has no SR '${srId}' (it has: ${destSrs.map((x) => x.id).join(', ')})`,
        });
        continue;
      }
      const format =
        entry.image_format ??
        (sr.supported_image_formats.includes(vdi.image_format) ? vdi.image_format : sr.default_image_format);
      if (!sr.supported_image_formats.includes(format)) {
        problems.push({
          vdi: vdi.id,
          message: `FORMAT_NOT_SUPPORTED: SR '${sr.id}' of the destination takes ${sr.supported_image_formats.join(', ')}, not ${format}`,
        });
      }
      if (format === 'vhd' && vdi.virtual_size > VHD_MAX_VIRTUAL_SIZE_BYTES) {
        problems.push({
          vdi: vdi.id,
          message: `FORMAT_NOT_SUPPORTED: a VHD holds at most 2040 GiB; VDI ${vdi.id} is larger`,
        });
      }
      plan.sr = sr.id;
      plan.format = format;
      if (mode === 'copy') {
        plan.dataBytes = await this.dataBytes(vdi.id);
        spaceBySr.set(sr.id, (spaceBySr.get(sr.id) ?? 0) + plan.dataBytes);
      }
    }
    for (const [srId, bytes] of spaceBySr) {
      const sr = info?.srs.find((x) => x.id === srId);
      if (sr && bytes > sr.free_space) {
        problems.push({
          vdi: null,
          message: `INSUFFICIENT_SPACE: the disks for SR '${srId}' hold ${bytes} bytes of data; it has ${sr.free_space} free`,
        });
      }
    }
    if (problems.length || !dest) {
      throw new ApiError(
        'MIGRATION_INVALID',
        `the migration cannot go ahead: ${problems.map((p) => (p.vdi ? `${p.vdi}: ${p.message}` : p.message)).join('; ')}`,
        { problems },
      );
    }

    const moving = plans.filter((p) => p.mode !== 'skip');
    const total = moving.reduce((n, p) => n + p.dataBytes, 0);
    const parent = this.s.tasks.start('set-migrate', null, { bytesTotal: total });
    for (const p of moving)
      p.task = this.s.tasks.start('migrate-disk', p.vdi.id, { bytesTotal: p.dataBytes });
    parent.setPartialResult(this.resultOf(set.id, token, plans));
    void this.run(parent, set.id, token, dest, plans, req.delete_source === true);
    return this.s.tasks.get(parent.id);
  }

  private async dataBytes(vdiId: string): Promise<number> {
    const lease = await this.s.vdis.images.lease(vdiId);
    try {
      return (await lease.extents()).filter((e) => !e.zero).reduce((n, e) => n + e.length, 0);
    } finally {
      lease.release();
    }
  }

  private resultOf(setId: string, token: ReceiveToken, plans: Plan[], extra: Record<string, unknown> = {}) {
    return {
      disk_set: setId,
      destination: token.url,
      migration: token.id,
      disks: plans.map((p) => ({
        vdi: p.vdi.id,
        mode: p.mode,
        task: p.task?.id ?? null,
        sr: p.mode === 'skip' ? null : p.sr,
        image_format: p.mode === 'skip' ? null : p.format,
        dest_vdi: p.destVdi ?? null,
      })),
      ...extra,
    };
  }

  private async run(
    parent: RunningTask,
    setId: string,
    token: ReceiveToken,
    dest: Destination,
    plans: Plan[],
    deleteSource: boolean,
  ): Promise<void> {
    const taken: string[] = [];
    const copies = plans.filter((p) => p.mode === 'copy');
    const check = (p?: Plan) => {
      parent.throwIfCancelled();
      p?.task?.throwIfCancelled();
    };
    try {
      for (const p of plans) {
        if (p.mode === 'skip') continue;
        check(p);
        const made = await dest.call<{ id: string }>(
          'POST',
          `/v1/migrations/${token.id}/vdis`,
          `the VDI for ${p.vdi.id}`,
          {
            name_label: p.vdi.name_label,
            name_description: p.vdi.name_description,
            virtual_size: p.vdi.virtual_size,
            sr: p.sr,
            image_format: p.format,
          },
          parent.signal,
        );
        p.destVdi = made.id;
        if (p.mode === 'blank') p.task?.succeed({ vdi: p.vdi.id, dest_vdi: made.id, mode: 'blank' });
      }
      parent.setPartialResult(this.resultOf(setId, token, plans));

      // The full copy, from one consistent snapshot.
      let snaps = this.snapshot(copies, taken);
      for (const p of copies) {
        const lease = await this.s.vdis.images.lease(snaps.get(p.vdi.id) as string);
        let ranges: [number, number][];
        try {
          ranges = (await lease.extents()).filter((e) => !e.zero).map((e) => [e.start, e.length]);
        } finally {
          lease.release();
        }
        await this.send(dest, token, p, snaps.get(p.vdi.id) as string, ranges, parent, check, true);
      }
      // Rounds of changed blocks; the last snapshot is the final one.
      let rounds = 0;
      for (;;) {
        rounds++;
        const next = this.snapshot(copies, taken);
        let delta = 0;
        for (const p of copies) {
          const { runs } = await changedBlocks(
            this.s.vdis,
            next.get(p.vdi.id) as string,
            snaps.get(p.vdi.id) as string,
          );
          // Runs of 64 KiB block indices; the last block may end past the disk.
          const ranges = runs.map(([first, end]) => {
            const start = first * CHANGED_BLOCK_BYTES;
            return [start, Math.min(end * CHANGED_BLOCK_BYTES, p.vdi.virtual_size) - start] as [
              number,
              number,
            ];
          });
          delta += ranges.reduce((n, r) => n + r[1], 0);
          await this.send(dest, token, p, next.get(p.vdi.id) as string, ranges, parent, check, false);
        }
        snaps = next;
        if (delta <= SMALL_DELTA_BYTES || rounds >= MAX_ROUNDS) break;
      }
      check();
      await dest.call('POST', `/v1/migrations/${token.id}/commit`, 'the commit', {}, parent.signal);
      for (const p of copies) p.task?.succeed({ vdi: p.vdi.id, dest_vdi: p.destVdi, mode: 'copy', rounds });
      const finals = copies.map((p) => ({ vdi: p.vdi.id, snapshot: snaps.get(p.vdi.id) as string }));
      // Only the final snapshots stay (they are what the destination holds), unless the sources go.
      const keep = new Set(deleteSource ? [] : finals.map((f) => f.snapshot));
      await this.removeSnapshots(taken.filter((id) => !keep.has(id)));
      if (deleteSource) {
        for (const p of plans) {
          if (p.mode !== 'skip') await this.s.vdis.delete(p.vdi.id);
        }
      }
      parent.succeed(
        this.resultOf(setId, token, plans, {
          rounds,
          final_snapshots: deleteSource ? [] : finals,
          source_deleted: deleteSource,
        }),
      );
    } catch (err) {
      const e = parent.signal.aborted ? (parent.signal.reason as CancelledError) : err;
      this.s.logger.warn({ err, task: parent.id }, 'set migration failed; aborting it on the destination');
      await dest.call('DELETE', `/v1/migrations/${token.id}`, 'the abort').catch((abortErr) => {
        this.s.logger.error(
          { err: abortErr },
          "the destination's migration could not be aborted; its token's expiry will",
        );
      });
      await this.removeSnapshots(taken);
      for (const p of plans) {
        if (p.task && p.task.record.status === 'running') p.task.fail(e);
      }
      parent.fail(e);
    }
  }

  /** Snapshots of the copied disks at one instant: source VDI id → snapshot id. */
  private snapshot(copies: Plan[], taken: string[]): Map<string, string> {
    const made = this.s.snapshots.snapshotAll(
      copies.map((p) => p.vdi.id),
      { name_label: 'set migration', name_description: 'taken by a set migration; removed when it ends' },
      (v) => v,
    );
    taken.push(...made.map((v) => v.id));
    return new Map(made.map((v) => [v.snapshot_of as string, v.id]));
  }

  private async removeSnapshots(ids: string[]): Promise<void> {
    for (const id of ids) {
      await this.s.vdis
        .delete(id)
        .catch((err) => this.s.logger.warn({ err, vdi: id }, 'a migration snapshot stays'));
    }
  }

  /**
   * Writes `ranges` of snapshot `snapId` into the disk's destination VDI
   * through one write ticket, then commits them there. `full`: the
   * destination is new (zeros), so zero chunks need not be sent.
   */
  private async send(
    dest: Destination,
    token: ReceiveToken,
    p: Plan,
    snapId: string,
    ranges: [number, number][],
    parent: RunningTask,
    check: (p?: Plan) => void,
    full: boolean,
  ): Promise<void> {
    if (ranges.length === 0) return;
    const { ticket, url } = await dest.call<{ ticket: string; url: string }>(
      'POST',
      `/v1/migrations/${token.id}/vdis/${p.destVdi}/tickets`,
      `a write ticket for ${p.vdi.id}`,
      {},
      parent.signal,
    );
    const lease = await this.s.vdis.images.lease(snapId);
    try {
      for (const [start, length] of ranges) {
        for (let off = start; off < start + length; off += CHUNK_BYTES) {
          check(p);
          const n = Math.min(CHUNK_BYTES, start + length - off);
          const data = await lease.image.read(off, n);
          if (isZero(data)) {
            if (!full) await dest.zero(url, off, n, parent.signal);
          } else {
            await dest.write(url, off, data, parent.signal);
          }
          if (full) {
            p.task?.addBytes(n);
            parent.addBytes(n);
          }
        }
      }
    } finally {
      lease.release();
    }
    await dest.call(
      'POST',
      `/v1/migrations/${token.id}/tickets/${ticket}/finalize`,
      `the commit of ${p.vdi.id}`,
      {},
      parent.signal,
    );
  }
}
