/**
 * A set migration's plan, checked whole before a byte moves: the
 * destination reachable and its migration open, each SR there, each format
 * taken by its SR, VHD's size limit, the data fitting. Every problem is
 * reported together (MIGRATION_INVALID, details.problems, one entry per
 * problem naming its disk).
 */
import type { Logger } from 'pino';
import { ApiError } from '../errors.js';
import type { DiskSets } from '../storage/disk-sets.js';
import type { Vdi, VdiStore } from '../storage/vdis.js';
import { FetchGuard, pinnedAgent } from './fetch-guard.js';
import { Destination } from './migration-destination.js';
import { decodeReceiveToken, type ReceiveToken } from './migration-receive.js';

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

const VHD_MAX_VIRTUAL_SIZE_BYTES = 2040 * 1024 ** 3;

interface DestSr {
  id: string;
  supported_image_formats: string[];
  default_image_format: string;
  free_space: number;
}

export interface Plan {
  vdi: Vdi;
  mode: DiskMode;
  sr: string;
  format: string;
  /** Bytes of data (allocated, non-zero extents) at planning time. */
  dataBytes: number;
}

export interface PlanDeps {
  vdis: VdiStore;
  diskSets: DiskSets;
  allowFetch: readonly string[];
  logger: Logger;
}

/** Checks everything; returns the plan per member and the destination's client, or throws MIGRATION_INVALID. */
export async function planMigration(
  s: PlanDeps,
  setId: string,
  req: SetMigrateRequest,
): Promise<{ plans: Plan[]; token: ReceiveToken; dest: Destination }> {
  const set = s.diskSets.get(setId);
  const members = s.diskSets.members(setId);
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
    const target = await new FetchGuard(s.allowFetch).check(token.url, 'dest');
    dest = new Destination(token, pinnedAgent(target), s.logger);
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
      plan.dataBytes = await dataBytes(s.vdis, vdi.id);
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

  return { plans, token, dest };
}

/** Bytes of data of a VDI: its allocated, non-zero extents. */
export async function dataBytes(vdis: VdiStore, vdiId: string): Promise<number> {
  const lease = await vdis.images.lease(vdiId);
  try {
    return (await lease.extents()).filter((e) => !e.zero).reduce((n, e) => n + e.length, 0);
  } finally {
    lease.release();
  }
}
