/** Storage repositories: a directory that holds VDI images, and which formats it stores them in. */
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { NotFoundError } from '../errors.js';
import { availableFormats } from '../formats/index.js';
import { cachedStatement, type Db, nowIso } from './db.js';

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

export class SrStore {
  constructor(private readonly db: Db) {}

  /** Makes sure the embedded default SR exists, with every format this build can store. */
  async ensureDefault(dataDir: string): Promise<Sr> {
    const dir = path.join(dataDir, 'srs', DEFAULT_SR_ID);
    await fsp.mkdir(path.join(dir, STAGING_DIR_NAME), { recursive: true });
    const formats = availableFormats();
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
        formats: JSON.stringify(formats),
        now: nowIso(),
      });
    return this.get(DEFAULT_SR_ID);
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
