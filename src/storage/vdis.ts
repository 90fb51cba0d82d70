/**
 * VDIs: metadata rows plus one image file each, in its SR's directory.
 *
 * Content is replaced by generations: an import writes a new file
 * `<id>.g<N>.<format>`, and the commit point is the one SQLite transaction
 * that points the VDI at it. A kill -9 before that leaves the old file in
 * charge; after it, the new one. Files no row points at are garbage,
 * collected at startup. The generation also names the content in ETags, so
 * an ETag stays valid across restarts and changes with every commit.
 */
import { randomUUID } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { ApiError, formatBytes, NotFoundError } from '../errors.js';
import { codecFor } from '../formats/index.js';
import type { BlockImage } from '../image/block-image.js';
import { ChainImage, type ChainLayer } from '../image/chain-image.js';
import { EmptyImage } from '../image/empty-image.js';
import { RawFileImage } from '../image/raw-file-image.js';
import { ResizedImage } from '../image/resized-image.js';
import { freeBytes, humanBytes, insufficientSpace, spaceError, spaceGuardOf } from '../image/space.js';
import { writeBlockDigests } from './block-digests.js';
import { ChainGate } from './chain-gate.js';
import { type ContentRow, Contents, decodeDefined } from './contents.js';
import { convertInto } from './convert.js';
import { cachedStatement, type Db, nowIso } from './db.js';
import { PROBE_PREFIX } from './file-limits.js';
import { ImageCache } from './image-cache.js';
import { type CommitOptions, commitContent } from './layer-commit.js';
import { openLayerFile } from './layer-files.js';
import { type Page, type PageRequest, selectPage } from './paging.js';
import type { Sr, SrStore } from './srs.js';
import { corruptAtRest, StoredImage } from './stored-image.js';
import type { VdiLocks } from './vdi-locks.js';

export interface Vdi {
  id: string;
  sr_id: string;
  name_label: string;
  name_description: string;
  virtual_size: number;
  image_format: string;
  generation: number;
  file_name: string;
  created_at: string;
  content_updated_at: string;
  /** 1 for a snapshot: read-only, its file a link of its source's generation at snapshot_time. */
  is_snapshot: number;
  /** The VDI a snapshot was taken of; kept when that VDI is deleted. */
  snapshot_of: string | null;
  snapshot_time: string | null;
  /**
   * The block digests of this content (block-digests.ts), a file in the SR
   * that snapshots and clones name too; null for content committed before
   * digests were kept.
   */
  digest_file: string | null;
  /**
   * The content this VDI reads (storage/contents.ts): the name its file was
   * first written under, shared by snapshots and clones of it; stable for
   * every committed generation.
   */
  content_id: string;
}

export interface VdiJson {
  id: string;
  name_label: string;
  name_description: string;
  virtual_size: number;
  physical_utilisation: number;
  sr: string;
  image_format: string;
  generation: number;
  created_at: string;
  content_updated_at: string;
  read_only: boolean;
  is_snapshot: boolean;
  snapshot_of: string | null;
  snapshot_time: string | null;
  /** A snapshot's VHD unique id: its VHD export's, and the parent id of delta VHDs against it. */
  vhd_uuid?: string;
}

/** List filters of GET /v1/vdis. */
export interface VdiFilter {
  is_snapshot?: boolean;
  snapshot_of?: string;
}

export interface CreateVdi {
  name_label: string;
  name_description?: string;
  virtual_size: number;
  sr?: string;
  image_format?: string;
}

/** qcow2's practical ceiling here; a format with a lower limit (VHD: 2040 GiB) refuses on export. */
export const MAX_VIRTUAL_SIZE_BYTES = 64 * 1024 ** 4;

/** Rows remembered between database changes (see VdiStore.rowsSinceLastWrite). */
const MAX_REMEMBERED_ROWS = 1024;

export class VdiStore {
  /** Images of committed generations, shared by the reads of one VDI. */
  readonly images = new ImageCache(this);
  /** What each VDI's file holds: the whole disk, or a layer over a parent. */
  readonly contents: Contents;
  /** Readers and commits of chains, which merges wait for (storage/merges.ts). */
  readonly gate = new ChainGate();
  /** Called after a delete or a commit changed which contents are held (merges are planned then). */
  onChainsChanged: () => void = () => {};
  /** Bytes delta imports read of the content they were laid onto (/metrics): O(the delta) after a snapshot. */
  deltaBaseBytesRead = 0;
  /** See rowsSinceLastWrite. */
  private readonly rows = new Map<string, Vdi>();
  private rowsAt = -1;

  constructor(
    private readonly db: Db,
    private readonly srs: SrStore,
    readonly locks: VdiLocks,
  ) {
    this.contents = new Contents(db);
  }

  get(id: string): Vdi {
    const rows = this.rowsSinceLastWrite();
    let row = rows?.get(id);
    if (!row) {
      row = cachedStatement(this.db, 'SELECT * FROM vdis WHERE id = ?').get(id) as Vdi | undefined;
      if (!row) throw new NotFoundError('vdi', id);
      if (rows && rows.size < MAX_REMEMBERED_ROWS) rows.set(id, row);
    }
    // A copy: a caller may change its own.
    return { ...row };
  }

  /**
   * Rows read since the database last changed, for the reads every request
   * makes (a ranged GET's VDI): a row read costs a file lock and a stat,
   * about 17 µs here, more than the rest of such a request's bookkeeping.
   * Only where this connection is the database's only writer (SQLite, which
   * counts every row it changes: total_changes() reads no table): any change
   * forgets them all. Not on PostgreSQL, where another node may have
   * committed a new generation since. Not inside a transaction, whose
   * changes a rollback takes back without being counted.
   */
  private rowsSinceLastWrite(): Map<string, Vdi> | undefined {
    if (this.db.inTransaction || !this.db.soleWriter) return undefined;
    const changes = this.db.changeCount();
    if (changes !== this.rowsAt) {
      this.rows.clear();
      this.rowsAt = changes;
    }
    return this.rows;
  }

  list(): Vdi[] {
    return this.db.prepare('SELECT * FROM vdis ORDER BY created_at, id').all() as Vdi[];
  }

  /** One page of VDIs, newest first. */
  listPage(filter: VdiFilter, page: PageRequest): Page<Vdi> {
    const where: string[] = [];
    const params: Record<string, unknown> = {};
    if (filter.is_snapshot !== undefined) {
      where.push('is_snapshot = @is_snapshot');
      params.is_snapshot = filter.is_snapshot ? 1 : 0;
    }
    if (filter.snapshot_of !== undefined) {
      where.push('snapshot_of = @snapshot_of');
      params.snapshot_of = filter.snapshot_of;
    }
    return selectPage<Vdi>(this.db, 'vdis', where, params, page);
  }

  /**
   * Throws 409 VDI_READ_ONLY unless the VDI's content may change: a snapshot
   * keeps the content it was taken with (`what` says what was refused).
   */
  assertWritable(vdi: Vdi, what: string): void {
    if (!vdi.is_snapshot) return;
    throw new ApiError(
      'VDI_READ_ONLY',
      `VDI ${vdi.id} is a snapshot and read-only: ${what} would change its content; ` +
        `clone it (POST /v1/vdis/${vdi.id}/clone) for a writable copy`,
      { vdi: vdi.id, snapshot_of: vdi.snapshot_of },
    );
  }

  countDeltaBaseBytes(n: number): void {
    this.deltaBaseBytesRead += n;
  }

  srOf(vdi: Vdi): Sr {
    return this.srs.get(vdi.sr_id);
  }

  imagePath(vdi: Vdi): string {
    return path.join(this.srOf(vdi).path, vdi.file_name);
  }

  /** A fresh staging path in the VDI's SR (same file system, so commit is a rename). */
  stagingPath(vdi: Vdi, name: string): string {
    return path.join(this.srs.stagingDir(this.srOf(vdi)), name);
  }

  /** A fresh staging path in an SR. */
  stagingPathIn(sr: Sr, name: string): string {
    return path.join(this.srs.stagingDir(sr), name);
  }

  /**
   * Records a new VDI whose content is `stagedFile` (in its format, in `sr`'s
   * staging directory, fsynced): its block digests written, the file renamed
   * to its generation file, the directory fsynced, then the row inserted; a
   * failure leaves none of them. `vdi.digest_file` is set here.
   */
  async placeNew(vdi: Vdi, sr: Sr, stagedFile: string): Promise<void> {
    const target = path.join(sr.path, vdi.file_name);
    vdi.digest_file = digestFileName(vdi.id, vdi.generation);
    const digests = await this.digestsOf(stagedFile, vdi.image_format, vdi.virtual_size, sr, vdi.digest_file);
    await fsp.rename(stagedFile, target);
    try {
      await fsyncDir(sr.path);
      this.insert(vdi);
    } catch (err) {
      await fsp.rm(target, { force: true });
      await fsp.rm(digests, { force: true });
      throw spaceError(err, 'the new VDI');
    }
  }

  /**
   * Writes the block digests of a staged image into `sr` as `name`. From the
   * copy, not the source's digest file: a commit to the source may remove
   * that file while the copy runs.
   */
  private async digestsOf(
    file: string,
    format: string,
    virtualSize: number,
    sr: Sr,
    name: string,
  ): Promise<string> {
    const digests = path.join(sr.path, name);
    const image = await this.openFile(file, format, virtualSize);
    try {
      await writeBlockDigests(image, digests);
    } catch (err) {
      await fsp.rm(digests, { force: true });
      throw spaceError(err, 'the block digests');
    } finally {
      await image.close();
    }
    return digests;
  }

  async create(req: CreateVdi): Promise<Vdi> {
    const sr = this.srs.get(req.sr ?? 'local');
    const format = req.image_format ?? sr.default_image_format;
    this.srs.assertFormat(sr, format);
    checkVirtualSize(req.virtual_size);
    this.checkFileSize(sr, format, req.virtual_size);
    const id = randomUUID();
    const fileName = generationFileName(id, 0, format);
    const file = path.join(sr.path, fileName);
    const now = nowIso();
    const vdi: Vdi = {
      id,
      sr_id: sr.id,
      name_label: req.name_label,
      name_description: req.name_description ?? '',
      virtual_size: req.virtual_size,
      image_format: format,
      generation: 0,
      file_name: fileName,
      created_at: now,
      content_updated_at: now,
      is_snapshot: 0,
      snapshot_of: null,
      snapshot_time: null,
      digest_file: digestFileName(id, 0),
      content_id: fileName,
    };
    const digests = path.join(sr.path, vdi.digest_file as string);
    // A failed create leaves nothing: neither a file nor a row.
    try {
      await convertInto(new EmptyImage(req.virtual_size), format, file);
      await writeBlockDigests(new EmptyImage(req.virtual_size), digests);
      this.insert(vdi);
    } catch (err) {
      await fsp.rm(file, { force: true });
      await fsp.rm(digests, { force: true });
      throw spaceError(err, `a ${format} VDI`);
    }
    return vdi;
  }

  /** Records a VDI whose file is already in place (and its directory fsynced). */
  insert(vdi: Vdi): void {
    this.db
      .prepare(
        `INSERT INTO vdis (id, sr_id, name_label, name_description, virtual_size, image_format, generation, file_name,
           created_at, content_updated_at, is_snapshot, snapshot_of, snapshot_time, digest_file, content_id)
         VALUES (@id, @sr_id, @name_label, @name_description, @virtual_size, @image_format, @generation, @file_name,
           @created_at, @content_updated_at, @is_snapshot, @snapshot_of, @snapshot_time, @digest_file, @content_id)`,
      )
      .run(vdi);
  }

  /** Runs `fn` in one metadata transaction (all of it or nothing); `fn` must not await. */
  inTransaction<T>(fn: () => T): T {
    return this.db.transaction(fn)();
  }

  /**
   * Records a snapshot or clone of `source` unless the source committed
   * since its row was read (its content may then be released): one
   * transaction, so a commit cannot slip between the check and the insert.
   */
  insertIfSame(vdi: Vdi, source: Vdi): boolean {
    return this.db.transaction(() => {
      const now = cachedStatement(this.db, 'SELECT content_id FROM vdis WHERE id = ?').get(source.id) as
        | { content_id: string }
        | undefined;
      if (now?.content_id !== source.content_id) return false;
      this.insert(vdi);
      return true;
    })();
  }

  /**
   * A raw VDI is one file of its virtual size: refused when the SR's file
   * system cannot hold a file that large (ext4: 16 TiB), which would fail
   * only later, or with an errno.
   */
  checkFileSize(sr: Sr, format: string, virtualSize: number): void {
    const max = this.srs.maxFileSize(sr, MAX_VIRTUAL_SIZE_BYTES);
    if (format !== 'raw' || max === null || virtualSize <= max) return;
    throw new ApiError(
      'INVALID_REQUEST',
      `a raw VDI of ${formatBytes(virtualSize)} cannot be stored in SR '${sr.id}': its file system holds files of at most ` +
        `${humanBytes(max)} (${max} bytes); make it smaller, or use image_format qcow2 or vhd, whose files grow with the data`,
      { virtual_size: virtualSize, max_file_size: max, sr: sr.id },
    );
  }

  /**
   * Throws 507 unless `bytes` more fit in the VDI's SR above its reserve
   * (a declared upload, before its first byte).
   */
  async ensureSpace(vdi: Vdi, bytes: number, what: string): Promise<void> {
    return this.ensureSpaceIn(this.srOf(vdi), bytes, what);
  }

  /** Throws 507 unless `bytes` more fit in the SR above its reserve. */
  async ensureSpaceIn(sr: Sr, bytes: number, what: string): Promise<void> {
    if (bytes <= 0) return;
    const dir = sr.path;
    const guard = spaceGuardOf(path.join(dir, 'any'));
    if (guard) return guard.ensure(bytes, what);
    const free = await freeBytes(dir);
    if (bytes > free) throw insufficientSpace(what, { needed: bytes, free, reserve: 0 });
  }

  /** Renames and/or grows a VDI. Shrinking would destroy data, so it is refused. */
  async update(
    id: string,
    patch: { name_label?: string; name_description?: string; virtual_size?: number },
  ): Promise<Vdi> {
    const vdi = this.get(id);
    if (patch.virtual_size !== undefined && patch.virtual_size !== vdi.virtual_size) {
      this.assertWritable(vdi, 'a resize');
      checkVirtualSize(patch.virtual_size);
      this.checkFileSize(this.srOf(vdi), vdi.image_format, patch.virtual_size);
      if (patch.virtual_size < vdi.virtual_size) {
        throw new ApiError(
          'SHRINK_NOT_ALLOWED',
          `cannot shrink VDI from ${formatBytes(vdi.virtual_size)} to ${formatBytes(patch.virtual_size)}: data past the new end would be lost`,
          { virtual_size: vdi.virtual_size, requested: patch.virtual_size },
        );
      }
      await this.resize(vdi, patch.virtual_size);
    }
    const fields = {
      name_label: patch.name_label ?? vdi.name_label,
      name_description: patch.name_description ?? vdi.name_description,
    };
    this.db
      .prepare('UPDATE vdis SET name_label=@name_label, name_description=@name_description WHERE id=@id')
      .run({ id, ...fields });
    return this.get(id);
  }

  private async resize(vdi: Vdi, newSize: number): Promise<void> {
    const release = this.locks.acquire(vdi.id, 'resize');
    try {
      const image = await this.openImage(vdi);
      const staged = this.stagingPath(vdi, `resize-${randomUUID()}`);
      try {
        await convertInto(new ResizedImage(image, newSize), vdi.image_format, staged);
      } catch (err) {
        await fsp.rm(staged, { force: true });
        throw spaceError(err, 'the resize');
      } finally {
        await image.close();
      }
      await this.commitContent(vdi.id, staged, { virtualSize: newSize }).catch(async (err) => {
        await fsp.rm(staged, { force: true });
        throw err;
      });
    } finally {
      release();
    }
  }

  async delete(id: string): Promise<void> {
    const vdi = this.get(id);
    this.locks.assertFree(id);
    const released = this.db.transaction(() => {
      this.db.prepare('DELETE FROM vdis WHERE id = ?').run(id);
      return this.contents.release(vdi.content_id);
    })();
    this.images.drop(id);
    await this.unlinkReleased(vdi, released, { wait: true });
    await this.dropDigests(vdi);
    this.onChainsChanged();
  }

  /** Path of the VDI's block digests, or null when its content has none. */
  digestPath(vdi: Vdi): string | null {
    return vdi.digest_file ? path.join(this.srOf(vdi).path, vdi.digest_file) : null;
  }

  /**
   * Path of the block digests of content `contentId` in `vdi`'s SR (its
   * own, or a parent's that a snapshot or clone holds), or null when no VDI
   * holding it names digests.
   */
  contentDigestPath(vdi: Vdi, contentId: string): string | null {
    if (contentId === vdi.content_id) return this.digestPath(vdi);
    const row = this.db
      .prepare('SELECT digest_file FROM vdis WHERE content_id = ? AND digest_file IS NOT NULL LIMIT 1')
      .get(contentId) as { digest_file: string } | undefined;
    return row ? path.join(this.srOf(vdi).path, row.digest_file) : null;
  }

  /** Removes the digest file `vdi` named, unless another VDI (a snapshot, a clone) still names it. */
  async dropDigests(vdi: Vdi): Promise<void> {
    if (!vdi.digest_file) return;
    const used = this.db.prepare('SELECT 1 FROM vdis WHERE digest_file = ? LIMIT 1').get(vdi.digest_file);
    if (!used) await fsp.rm(path.join(this.srOf(vdi).path, vdi.digest_file), { force: true });
  }

  /** Opens a file of the VDI's format at rest as the disk it holds. */
  openFile(file: string, format: string, virtualSize: number): Promise<BlockImage> {
    if (format === 'raw') return RawFileImage.open(file, { virtualSize });
    return codecFor(format).open(file);
  }

  /**
   * After a VDI stopped naming its file (deleted, or committed anew): unlinks
   * that name unless a layer reads it as its parent, and the id-named files
   * of the contents nothing holds any more.
   */
  async unlinkReleased(vdi: Vdi, released: readonly string[], opts: { wait?: boolean } = {}): Promise<void> {
    const dir = this.srOf(vdi).path;
    const names = new Set(released);
    if (!this.contents.isParent(vdi.file_name)) names.add(vdi.file_name);
    const unlinks = [...names].map((name) => fsp.rm(path.join(dir, name), { force: true }));
    // After a commit, nobody waits for the unlinks of a large old file: not
    // the client (readers still holding it keep their open file), not
    // correctness (a file left by a crash is collected at startup). A delete
    // answers once its space is given back.
    if (opts.wait) await Promise.all(unlinks);
    else for (const u of unlinks) u.catch(() => {});
  }

  /**
   * Opens the VDI's current content as a disk to read. The handle keeps this
   * generation readable even after a commit; content changes by committing a
   * new generation, never by writing into this one.
   */
  openImage(vdi: Vdi): Promise<BlockImage> {
    const row = this.contents.get(vdi.content_id);
    // Registered now, before any await: a merge deciding meanwhile sees this reader.
    const done = this.gate.openReader(row ? this.contents.chain(row.id).map((r) => r.id) : [vdi.content_id]);
    const opening = row?.parent
      ? this.openChain(vdi, row)
      : this.openFile(this.imagePath(vdi), vdi.image_format, vdi.virtual_size);
    // A container at rest that no longer decodes was damaged there: IMAGE_CORRUPT (see StoredImage).
    const raw = vdi.image_format === 'raw';
    return opening.then(
      (image) => untilClosed(raw ? image : new StoredImage(image, vdi.id), done),
      (err) => {
        done();
        throw raw ? err : corruptAtRest(vdi.id, err);
      },
    );
  }

  /** The contents a VDI's reads and commits go through, top first. */
  chainIdsOf(vdi: Vdi): string[] {
    const ids = this.contents.chain(vdi.content_id).map((r) => r.id);
    return ids.length ? ids : [vdi.content_id];
  }

  /** A layered VDI: its file over its parents' id-named files, read as one disk. */
  private async openChain(vdi: Vdi, top: ContentRow): Promise<BlockImage> {
    const dir = this.srOf(vdi).path;
    const layers: ChainLayer[] = [];
    try {
      const image = await openLayerFile(this.imagePath(vdi), vdi.image_format, vdi.virtual_size);
      layers.push({ image, defined: decodeDefined(top) });
      for (let id = top.parent; id !== null; ) {
        const row = this.contents.get(id);
        // Released meanwhile (the row read was older): the image cache reads the row again.
        if (!row) throw Object.assign(new Error(`content ${id} is gone`), { code: 'ENOENT' });
        const parent = await openLayerFile(path.join(dir, row.id), vdi.image_format, row.virtual_size);
        layers.push({ image: parent, defined: decodeDefined(row) });
        id = row.parent;
      }
    } catch (err) {
      await Promise.all(layers.map((l) => l.image.close()));
      throw err;
    }
    return new ChainImage(vdi.virtual_size, layers);
  }

  /** A content's own disk (its chain), for writing a layer over it. */
  async openContent(vdi: Vdi, id: string): Promise<BlockImage> {
    const row = this.contents.get(id);
    const file = path.join(this.srOf(vdi).path, id);
    if (!row) return this.openFile(file, vdi.image_format, vdi.virtual_size);
    return this.openChain({ ...vdi, file_name: id, virtual_size: row.virtual_size }, row);
  }

  /** Makes `stagedFile` (in the VDI's format at rest, fsynced) the VDI's content: see layer-commit.ts. */
  commitContent(id: string, stagedFile: string, opts: CommitOptions = {}): Promise<Vdi> {
    return commitContent(this, id, stagedFile, opts);
  }

  /**
   * Makes `stagedFile` (a copy of the VDI's content in `format`, in `sr`'s
   * staging directory, fsynced) the VDI's content, in that SR: the VDI keeps
   * its id and everything that names it (snapshots, sets), its next
   * generation's file now in the other SR. Renamed into place and its
   * directory fsynced before the row switches in one transaction, so a kill
   * -9 leaves either the old row (and an orphan file in the new SR) or the
   * new row (and an orphan in the old one), each collected at startup.
   * Refused (the staged file left to the caller) when the VDI committed
   * other content since `fromGeneration`.
   */
  async relocate(
    id: string,
    fromGeneration: number,
    sr: Sr,
    format: string,
    stagedFile: string,
  ): Promise<Vdi> {
    const vdi = this.get(id);
    const generation = vdi.generation + 1;
    const fileName = generationFileName(id, generation, format);
    const target = path.join(sr.path, fileName);
    if (vdi.generation !== fromGeneration) throw contentChanged(id);
    const digestFile = digestFileName(id, generation);
    const digests = await this.digestsOf(stagedFile, format, vdi.virtual_size, sr, digestFile);
    await fsp.rename(stagedFile, target);
    let released: string[];
    let left = vdi;
    // The copy is flat: a new content of its own (as a commit's), and the chain it
    // leaves (a layer over a snapshot's content) released as far as nothing else holds it.
    const leave = await this.gate.enterCommit(() => this.chainIdsOf(this.get(id)));
    try {
      await fsyncDir(sr.path);
      released = this.db.transaction(() => {
        this.locks.assertHeld(id);
        left = this.get(id);
        const switched = this.db
          .prepare(
            `UPDATE vdis SET sr_id=@sr, image_format=@format, generation=@generation, file_name=@fileName,
             content_id=@fileName, digest_file=@digestFile WHERE id=@id AND generation=@fromGeneration`,
          )
          .run({ id, sr: sr.id, format, generation, fileName, digestFile, fromGeneration });
        if (switched.changes !== 1) throw contentChanged(id);
        return this.contents.release(left.content_id);
      })();
    } catch (err) {
      await fsp.rm(target, { force: true });
      await fsp.rm(digests, { force: true });
      throw spaceError(err, 'the switch');
    } finally {
      leave();
    }
    this.onChainsChanged();
    this.images.drop(id);
    await this.dropDigests(vdi);
    // Readers of the old file keep it open; nobody waits for its blocks to be freed.
    await this.unlinkReleased(left, released);
    return this.get(id);
  }

  /** Inside a commit's transaction: points the VDI's row at its new generation (layer-commit.ts). */
  switchRow(
    id: string,
    to: { generation: number; fileName: string; virtualSize: number; updatedAt: string; digestFile: string },
  ): void {
    // A node whose hold on the VDI lapsed (presumed dead) commits nothing.
    this.locks.assertHeld(id);
    cachedStatement(
      this.db,
      `UPDATE vdis SET generation=@generation, file_name=@fileName, content_id=@fileName,
       virtual_size=@virtualSize, content_updated_at=@updatedAt, digest_file=@digestFile WHERE id=@id`,
    ).run({ id, ...to });
  }

  async physicalUtilisation(vdi: Vdi): Promise<number> {
    try {
      return (await fsp.stat(this.imagePath(vdi))).blocks * 512;
    } catch {
      return 0;
    }
  }

  /**
   * Bytes allocated for the SR's VDIs, each file counted once: a snapshot or
   * a clone shares its source's file (one inode, several names) until either
   * changes, and costs nothing until then.
   */
  async srUtilisation(sr: Sr): Promise<number> {
    const seen = new Set<string>();
    let used = 0;
    const rows = this.db.prepare('SELECT file_name FROM vdis WHERE sr_id = ?').all(sr.id) as {
      file_name: string;
    }[];
    rows.push(...this.contents.parentIds(sr.id).map((id) => ({ file_name: id })));
    for (const { file_name } of rows) {
      try {
        const st = await fsp.stat(path.join(sr.path, file_name), { bigint: true });
        const inode = `${st.dev}:${st.ino}`;
        if (seen.has(inode)) continue;
        seen.add(inode);
        used += Number(st.blocks) * 512;
      } catch {
        // deleted meanwhile
      }
    }
    return used;
  }

  async toJson(vdi: Vdi): Promise<VdiJson> {
    return {
      id: vdi.id,
      name_label: vdi.name_label,
      name_description: vdi.name_description,
      virtual_size: vdi.virtual_size,
      physical_utilisation: await this.physicalUtilisation(vdi),
      sr: vdi.sr_id,
      image_format: vdi.image_format,
      generation: vdi.generation,
      created_at: vdi.created_at,
      content_updated_at: vdi.content_updated_at,
      read_only: vdi.is_snapshot === 1,
      is_snapshot: vdi.is_snapshot === 1,
      snapshot_of: vdi.snapshot_of,
      snapshot_time: vdi.snapshot_time,
      ...(vdi.is_snapshot ? { vhd_uuid: vdi.id } : {}),
    };
  }

  /**
   * Startup: removes image files no VDI points at (a crash between writing a
   * generation and committing it, or between committing and unlinking the old
   * one) and every staging file not listed in `keepStaging`. Only names
   * diskport gives its files are touched: an SR may be a mount point of its
   * own (with `lost+found`), or hold what someone put there.
   */
  async collectGarbage(keepStaging: ReadonlySet<string> = new Set()): Promise<string[]> {
    const removed: string[] = [];
    // Contents a crash left unheld (between a commit or delete and its release).
    this.contents.releaseUnheld();
    for (const sr of this.srs.list()) {
      const rows = this.db.prepare('SELECT file_name, digest_file FROM vdis WHERE sr_id = ?').all(sr.id) as {
        file_name: string;
        digest_file: string | null;
      }[];
      const live = new Set(
        rows.flatMap((r) => (r.digest_file ? [r.file_name, r.digest_file] : [r.file_name])),
      );
      // A parent of layers is read under its id.
      for (const id of this.contents.parentIds(sr.id)) live.add(id);
      for (const name of await fsp.readdir(sr.path)) {
        if (!GENERATION_FILE_NAME.test(name) || live.has(name)) continue;
        await fsp.rm(path.join(sr.path, name), { force: true });
        removed.push(name);
      }
      const staging = this.srs.stagingDir(sr);
      for (const name of await fsp.readdir(staging)) {
        const file = path.join(staging, name);
        if (!STAGING_FILE_NAME.test(name) || keepStaging.has(file)) continue;
        await fsp.rm(file, { force: true });
        removed.push(file);
      }
    }
    return removed;
  }
}

/**
 * The VHD unique id a snapshot's exports carry (its own id), so a delta
 * export can name it as its parent's; other VDIs' VHDs get one from their
 * layout.
 */
export function vhdUuidOf(vdi: Vdi): Buffer | undefined {
  return vdi.is_snapshot ? Buffer.from(vdi.id.replaceAll('-', ''), 'hex') : undefined;
}

/** `image`, whose close() also runs `done` (once). */
function untilClosed(image: BlockImage, done: () => void): BlockImage {
  const close = image.close.bind(image);
  image.close = () => {
    done();
    return close();
  };
  return image;
}

function contentChanged(id: string): ApiError {
  return new ApiError(
    'VDI_BUSY',
    `VDI ${id} committed new content while it was being copied; run the operation again`,
    { vdi: id },
  );
}

export function generationFileName(id: string, generation: number, format: string): string {
  return `${id}.g${generation}.${format}`;
}

/** The block digests of a generation (a name GENERATION_FILE_NAME matches, so startup collects orphans). */
export function digestFileName(id: string, generation: number): string {
  return `${id}.g${generation}.digests`;
}

const UUID = '[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}';
/** What generationFileName makes. */
const GENERATION_FILE_NAME = new RegExp(`^${UUID}\\.g\\d+\\.[a-z0-9]+$`);
/**
 * Staging files: an upload's (`transfer-<id>.<format>`, and beside it its
 * chunks landed aside, its converted image, a streaming import's disk), a
 * resize's, a copy's into another SR (clone, migration), a merge's new link
 * of a merged layer, a file-size probe's.
 */
const STAGING_FILE_NAME = new RegExp(
  `^(transfer|resize|copy|merge|${PROBE_PREFIX.slice(0, -1)})-${UUID}(\\.[A-Za-z0-9.-]+)?$`,
);

function checkVirtualSize(size: number): void {
  if (!Number.isSafeInteger(size) || size <= 0 || size % 512 !== 0) {
    throw new ApiError(
      'INVALID_REQUEST',
      `virtual_size must be a positive multiple of 512 bytes, got ${size}`,
      {
        virtual_size: size,
      },
    );
  }
  if (size > MAX_VIRTUAL_SIZE_BYTES) {
    throw new ApiError(
      'INVALID_REQUEST',
      `virtual_size ${formatBytes(size)} is larger than the supported maximum of ${formatBytes(MAX_VIRTUAL_SIZE_BYTES)}`,
    );
  }
}

export async function fsyncDir(dir: string): Promise<void> {
  const h = await fsp.open(dir, 'r');
  try {
    await h.sync();
  } finally {
    await h.close();
  }
}
