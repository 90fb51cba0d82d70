/** Storage repositories: a directory that holds VDI images, and which formats it stores them in. */
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { NotFoundError } from '../errors.js';
import { availableFormats } from '../formats/index.js';
import { PRIVATE_DIR_MODE } from '../image/file-io.js';
import { guardSpace } from '../image/space.js';
import { cachedStatement, type Db, nowIso } from './db.js';
import { probeMaxFileSize } from './file-limits.js';

export interface Sr {
  id: string;
  name_label: string;
  path: string;
  supported_image_formats: string[];
  default_image_format: string;
}

export interface SrJson {
  id: string;
  name_label: string;
  supported_image_formats: string[];
  default_image_format: string;
  physical_size: number;
  physical_utilisation: number;
  free_space: number;
}

interface SrRow extends Omit<Sr, 'supported_image_formats'> {
  supported_image_formats: string;
}

export const DEFAULT_SR_ID = 'local';
export const STAGING_DIR_NAME = '.staging';

/** Space kept free on an SR for the metadata store's writes unless configured (see image/space.ts). */
export const DEFAULT_SPACE_RESERVE_BYTES = 32 * 1024 * 1024;

export class SrStore {
  /** The largest file each SR's file system holds, up to the probe's ceiling (file-limits.ts). */
  private readonly maxFileSizes = new Map<string, number>();

  constructor(
    private readonly db: Db,
    private readonly opts: { spaceReserveBytes?: number } = {},
  ) {}

  /**
   * Makes sure the embedded default SR exists, with every format this build
   * can store, and learns its file system's limits. `maxFileCeiling`: the
   * largest file size worth probing for (the largest VDI).
   */
  async ensureDefault(dataDir: string, maxFileCeiling: number): Promise<Sr> {
    const dir = path.join(dataDir, 'srs', DEFAULT_SR_ID);
    await fsp.mkdir(path.join(dir, STAGING_DIR_NAME), { recursive: true, mode: PRIVATE_DIR_MODE });
    const formats = JSON.stringify(availableFormats());
    // Written only when it changed: a start-up on a full disk must not need to write.
    const row = this.db
      .prepare('SELECT path, supported_image_formats FROM srs WHERE id = ?')
      .get(DEFAULT_SR_ID) as Pick<SrRow, 'path' | 'supported_image_formats'> | undefined;
    if (row?.path !== dir || row.supported_image_formats !== formats) this.upsertDefault(dir, formats);
    guardSpace(dir, this.opts.spaceReserveBytes ?? DEFAULT_SPACE_RESERVE_BYTES);
    const max = await probeMaxFileSize(path.join(dir, STAGING_DIR_NAME), maxFileCeiling);
    if (max !== null) this.maxFileSizes.set(DEFAULT_SR_ID, max);
    return this.get(DEFAULT_SR_ID);
  }

  /** The largest file the SR's file system holds, when it is smaller than the largest VDI; else null. */
  maxFileSize(sr: Sr, ceiling: number): number | null {
    const max = this.maxFileSizes.get(sr.id);
    return max === undefined || max >= ceiling ? null : max;
  }

  private upsertDefault(dir: string, formats: string): void {
    this.db
      .prepare(
        `INSERT INTO srs (id, name_label, path, supported_image_formats, default_image_format, created_at)
         VALUES (@id, @name_label, @path, @formats, 'raw', @now)
         ON CONFLICT(id) DO UPDATE SET path=@path, supported_image_formats=@formats`,
      )
      .run({
        id: DEFAULT_SR_ID,
        name_label: 'Local storage',
        path: dir,
        formats,
        now: nowIso(),
      });
  }

  get(id: string): Sr {
    const row = cachedStatement(this.db, 'SELECT * FROM srs WHERE id = ?').get(id) as SrRow | undefined;
    if (!row) throw new NotFoundError('sr', id);
    return { ...row, supported_image_formats: JSON.parse(row.supported_image_formats) };
  }

  list(): Sr[] {
    return (this.db.prepare('SELECT id FROM srs ORDER BY id').all() as { id: string }[]).map((r) =>
      this.get(r.id),
    );
  }

  stagingDir(sr: Sr): string {
    return path.join(sr.path, STAGING_DIR_NAME);
  }

  async toJson(sr: Sr, utilisation: number): Promise<SrJson> {
    const fs = await fsp.statfs(sr.path);
    return {
      id: sr.id,
      name_label: sr.name_label,
      supported_image_formats: sr.supported_image_formats,
      default_image_format: sr.default_image_format,
      physical_size: fs.blocks * fs.bsize,
      physical_utilisation: utilisation,
      free_space: fs.bavail * fs.bsize,
    };
  }
}
