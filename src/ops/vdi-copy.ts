/**
 * Copies of a VDI into another SR, in a format that SR takes, run as tasks:
 * a clone into another SR (a new VDI) and a migration (the same VDI, moved:
 * xapi's `VDI.pool_migrate`). Both read the source through the image cache
 * (the BlockImage of its committed content, whatever it is stored as) and
 * write a new file of the destination format in the destination SR's staging
 * directory: only allocated data is read and written, holes stay holes.
 *
 * Everything that can be refused is refused before a byte moves: an SR that
 * does not take the format, a size the format cannot hold (VHD: 2040 GiB), a
 * raw file larger than the SR's file system allows, too little space. A
 * cancel or a failure removes the staged file and leaves the source as it
 * was; a kill -9 leaves a staging file that startup collects.
 *
 * A migration holds the VDI's writer lock from request to switch: imports,
 * upload sessions, resizes and deletes are 409 VDI_BUSY meanwhile (reads,
 * exports and snapshots go on, from the old SR). Making writers wait instead
 * would mean holding uploads open for as long as a copy of the whole disk
 * takes; a client retrying on VDI_BUSY gets the same result sooner.
 */
import { randomUUID } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import { ApiError, formatBytes } from '../errors.js';
import { allocatedBytes } from '../image/block-image.js';
import { spaceError } from '../image/space.js';
import { convertInto } from '../storage/convert.js';
import { nowIso } from '../storage/db.js';
import type { ImageLease } from '../storage/image-cache.js';
import type { Sr, SrStore } from '../storage/srs.js';
import { generationFileName, type Vdi, type VdiStore } from '../storage/vdis.js';
import type { RunningTask, TaskManager } from '../tasks/task-manager.js';
import type { Task } from '../tasks/task-store.js';

/** qemu's limit for VHD (block/vpc.c VHD_MAX_SECTORS), as the vhd codec keeps it. */
export const VHD_MAX_VIRTUAL_SIZE_BYTES = 2040 * 1024 ** 3;

export interface CopyTarget {
  sr: string;
  image_format?: string;
}

export interface CloneCopy extends CopyTarget {
  name_label?: string;
  name_description?: string;
}

interface Plan {
  source: Vdi;
  sr: Sr;
  format: string;
}

export class VdiCopies {
  constructor(
    private readonly vdis: VdiStore,
    private readonly srs: SrStore,
    private readonly tasks: TaskManager,
  ) {}

  /** True when a clone to `target` must copy: another SR, or another format. */
  needsCopy(source: Vdi, target: Partial<CopyTarget>): boolean {
    return (
      (target.sr !== undefined && target.sr !== source.sr_id) ||
      (target.image_format !== undefined && target.image_format !== source.image_format)
    );
  }

  /** Starts a copy of `sourceId` into a new VDI of `req.sr`; returns its task (result: the new VDI). */
  async clone(sourceId: string, req: CloneCopy): Promise<Task> {
    const plan = this.plan(sourceId, req);
    const lease = await this.vdis.images.lease(sourceId);
    try {
      await this.checkSpace(plan, lease, 'the clone');
    } catch (err) {
      lease.release();
      throw err;
    }
    const task = this.tasks.start('clone', plan.source.id);
    void this.run(task, lease, plan, async (staged) => {
      const id = randomUUID();
      const fileName = generationFileName(id, 0, plan.format);
      const now = nowIso();
      const vdi: Vdi = {
        ...lease.vdi,
        id,
        sr_id: plan.sr.id,
        image_format: plan.format,
        generation: 0,
        file_name: fileName,
        created_at: now,
        content_updated_at: now,
        is_snapshot: 0,
        snapshot_of: null,
        snapshot_time: null,
        name_label: req.name_label ?? lease.vdi.name_label,
        name_description: req.name_description ?? lease.vdi.name_description,
      };
      await this.vdis.placeNew(vdi, plan.sr, staged);
      return { vdi: id, sr: plan.sr.id, image_format: plan.format, source: lease.vdi.id };
    });
    return this.tasks.get(task.id);
  }

  /**
   * Starts moving `vdiId` into `req.sr` (in `req.image_format`, by default
   * its own format when that SR takes it, else the SR's default); returns
   * the task. The VDI is busy until the task ends.
   */
  async migrate(vdiId: string, req: CopyTarget): Promise<Task> {
    const plan = this.plan(vdiId, req);
    if (plan.sr.id === plan.source.sr_id && plan.format === plan.source.image_format) {
      // Already there: nothing to move, and the answer is the same as for a move.
      const task = this.tasks.start('migrate', vdiId);
      task.succeed(migrated(plan.source));
      return this.tasks.get(task.id);
    }
    const taskId = randomUUID();
    const release = this.vdis.locks.acquire(vdiId, `migration ${taskId}`);
    let lease: ImageLease | undefined;
    try {
      lease = await this.vdis.images.lease(vdiId);
      await this.checkSpace(plan, lease, 'the migration');
    } catch (err) {
      lease?.release();
      release();
      throw err;
    }
    const task = this.tasks.start('migrate', vdiId, { id: taskId });
    const from = lease.vdi.generation;
    void this.run(task, lease, plan, async (staged) =>
      migrated(await this.vdis.relocate(vdiId, from, plan.sr, plan.format, staged)),
    ).finally(release);
    return this.tasks.get(task.id);
  }

  /** Validates the destination and picks the format, before anything is read or written. */
  private plan(sourceId: string, req: Partial<CopyTarget>): Plan {
    const source = this.vdis.get(sourceId);
    const sr = this.srs.get(req.sr ?? source.sr_id);
    const format =
      req.image_format ??
      (sr.supported_image_formats.includes(source.image_format)
        ? source.image_format
        : sr.default_image_format);
    this.srs.assertFormat(sr, format, `VDI ${source.id}`);
    if (format === 'vhd' && source.virtual_size > VHD_MAX_VIRTUAL_SIZE_BYTES) {
      throw new ApiError(
        'FORMAT_NOT_SUPPORTED',
        `VDI ${source.id} is ${formatBytes(source.virtual_size)}, larger than a VHD can hold ` +
          `(${formatBytes(VHD_MAX_VIRTUAL_SIZE_BYTES)}); choose image_format qcow2 or raw`,
        {
          sr: sr.id,
          image_format: format,
          virtual_size: source.virtual_size,
          max_virtual_size: VHD_MAX_VIRTUAL_SIZE_BYTES,
        },
      );
    }
    this.vdis.checkFileSize(sr, format, source.virtual_size);
    return { source, sr, format };
  }

  /** The data to copy must fit in the destination SR (the format's metadata is small beside it). */
  private async checkSpace(plan: Plan, lease: ImageLease, what: string): Promise<void> {
    const data = allocatedBytes(await lease.extents());
    await this.vdis.ensureSpaceIn(plan.sr, data, what);
  }

  /** Copies into a staged file, then `place`s it; the staged file never outlives a failure. */
  private async run(
    task: RunningTask,
    lease: ImageLease,
    plan: Plan,
    place: (staged: string) => Promise<Record<string, unknown>>,
  ): Promise<void> {
    const staged = this.vdis.stagingPathIn(plan.sr, `copy-${task.id}.${plan.format}`);
    try {
      const extents = await lease.extents();
      task.setTotal(
        plan.format === 'raw' ? allocatedBytes(extents) : (await lease.serialize(plan.format)).size,
      );
      await convertInto(lease.image, plan.format, staged, {
        signal: task.signal,
        onBytes: (n) => task.addBytes(n),
      }).catch((err) => Promise.reject(spaceError(err, 'the copy')));
      task.throwIfCancelled();
      task.succeed(await place(staged));
    } catch (err) {
      await fsp.rm(staged, { force: true }).catch(() => {});
      task.fail(err);
    } finally {
      lease.release();
    }
  }
}

function migrated(vdi: Vdi): Record<string, unknown> {
  return { vdi: vdi.id, sr: vdi.sr_id, image_format: vdi.image_format, generation: vdi.generation };
}
