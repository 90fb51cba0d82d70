/** Storage repositories: a directory that holds VDI images, and which formats it stores them in. */
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import type { SrConfig } from '../config.js';
import { ApiError, NotFoundError } from '../errors.js';
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

  /**
   * Opens (creating their directories) the SRs configured beside the default
   * one, as `--sr` describes them now: a changed directory or format list is
   * recorded. An SR no longer configured is forgotten when it holds no VDI;
   * one that still holds VDIs stops the start-up, since they would be lost.
   */
  async ensureConfigured(configured: readonly SrConfig[], maxFileCeiling: number): Promise<Sr[]> {
    const known = new Set(configured.map((c) => c.id));
    for (const { id } of this.db.prepare("SELECT id FROM srs WHERE id != 'local'").all() as {
      id: string;
    }[]) {
      if (known.has(id)) continue;
      const { n } = this.db.prepare('SELECT count(*) AS n FROM vdis WHERE sr_id = ?').get(id) as {
        n: number;
      };
      if (n > 0) {
        throw new Error(
          `SR '${id}' holds ${n} VDI(s) but is not configured: start with --sr ${id}=PATH (its directory) to keep serving them`,
        );
      }
      this.db.prepare('DELETE FROM srs WHERE id = ?').run(id);
    }
    const local = this.get(DEFAULT_SR_ID).path;
    const opened: Sr[] = [];
    for (const c of configured) {
      // Each SR collects the files of its own VDIs only: two sharing a directory would delete each other's.
      const twin = configured.find((o) => o !== c && o.path === c.path);
      if (c.path === local || twin) {
        throw new Error(
          `SR '${c.id}' shares its directory ${c.path} with SR '${twin?.id ?? DEFAULT_SR_ID}': give each SR its own`,
        );
      }
      await fsp.mkdir(path.join(c.path, STAGING_DIR_NAME), { recursive: true, mode: PRIVATE_DIR_MODE });
      const formats = JSON.stringify(c.formats.filter((f) => availableFormats().includes(f as never)));
      const row = this.db.prepare('SELECT * FROM srs WHERE id = ?').get(c.id) as SrRow | undefined;
      if (
        row?.path !== c.path ||
        row.supported_image_formats !== formats ||
        row.default_image_format !== c.formats[0]
      ) {
        this.db
          .prepare(
            `INSERT INTO srs (id, name_label, path, supported_image_formats, default_image_format, created_at)
             VALUES (@id, @id, @path, @formats, @default, @now)
             ON CONFLICT(id) DO UPDATE SET path=@path, supported_image_formats=@formats, default_image_format=@default`,
          )
          .run({ id: c.id, path: c.path, formats, default: c.formats[0], now: nowIso() });
      }
      guardSpace(c.path, this.opts.spaceReserveBytes ?? DEFAULT_SPACE_RESERVE_BYTES);
      const max = await probeMaxFileSize(path.join(c.path, STAGING_DIR_NAME), maxFileCeiling);
      if (max !== null) this.maxFileSizes.set(c.id, max);
      opened.push(this.get(c.id));
    }
    return opened;
  }

  /**
   * Throws 400 FORMAT_NOT_SUPPORTED unless the SR stores images in `format`
   * (`what` says what needed it).
   */
  assertFormat(sr: Sr, format: string, what = 'images'): void {
    if (sr.supported_image_formats.includes(format)) return;
    throw new ApiError(
      'FORMAT_NOT_SUPPORTED',
      `SR '${sr.id}' cannot store ${what} in format '${format}'; it supports: ${sr.supported_image_formats.join(', ')}`,
      { sr: sr.id, image_format: format, supported_image_formats: sr.supported_image_formats },
    );
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
