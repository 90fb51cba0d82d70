/**
 * ovirt-imageio tickets over diskport transfer sessions.
 *
 * A ticket (installed by its management API, as oVirt's engine does) names
 * one VDI, the ops it allows and its deadlines; its id is the only
 * credential of `/images/{ticket-id}`. Underneath it is a transfer session:
 * a `write` ticket an upload session whose bytes land in staging and commit
 * atomically at finalize, a `read` ticket a download session. So a ticket
 * survives a restart, shows in /v1/transfers and has a task.
 *
 * Deadlines: as in imageio, a ticket expires `timeout` seconds after it was
 * installed, extended (PATCH) or last used (every request's end pushes the
 * deadline on); `inactivity_timeout` is the session's own sliding ttl, which
 * every request renews too.
 *
 * imageio writes in place: what a client does not write keeps the disk's
 * previous content, and a read through a write ticket (write implies read)
 * sees the disk as written so far. So reads, extents and checksums of a
 * write ticket see the VDI's committed content overlaid with every range
 * the ticket wrote (flushed or not); at finalize what the ticket wrote is
 * laid over the VDI's current content (an in-place session, commitWrites),
 * so an incremental restore that writes only changed extents works, costs
 * what it wrote (after a snapshot, not the disk's size), and the commit
 * stays all-or-nothing.
 *
 * A ticket's `size` may be smaller than the VDI (imageio bounds every
 * request by the ticket's size): the ticket then sees the VDI's first `size`
 * bytes, and an upload leaves the rest as it was. A size larger than the
 * VDI is refused.
 */
import { randomUUID } from 'node:crypto';
import type { Logger } from 'pino';
import { ApiError } from '../errors.js';
import { codecFor } from '../formats/index.js';
import type { BlockImage, ByteSpan, Extent } from '../image/block-image.js';
import { ChainImage, type ChainLayer } from '../image/chain-image.js';
import { RawFileImage } from '../image/raw-file-image.js';
import { baseSnapshotOf } from '../ops/changed-blocks.js';
import type { Db } from '../storage/db.js';
import type { ImageLease } from '../storage/image-cache.js';
import type { Vdi, VdiStore } from '../storage/vdis.js';
import type { TaskManager } from '../tasks/task-manager.js';
import type { Task } from '../tasks/task-store.js';
import type { ExportSource } from './export.js';
import type { ByteRange } from './range-set.js';
import type { TransferService } from './sessions.js';
import type { Transfer } from './transfer-store.js';

export type TicketOp = 'read' | 'write';
type TicketState = 'installed' | 'finalized' | 'canceled' | 'expired' | 'deleted';

/** imageio's ticket JSON, as its management API takes it. */
export interface TicketRequest {
  uuid?: string;
  size: number;
  url: string;
  ops: TicketOp[];
  timeout: number;
  inactivity_timeout?: number;
  sparse?: boolean;
  dirty?: boolean;
  transfer_id?: string;
}

export interface Ticket {
  id: string;
  transfer_id: string;
  vdi_id: string;
  /** The snapshot dirty extents are taken from (`vdi:{id}?since={snapshot}`). */
  since: string | null;
  url: string;
  ops: TicketOp[];
  size: number;
  timeout: number;
  inactivity_timeout: number;
  sparse: boolean;
  dirty: boolean;
  client_transfer_id: string | null;
  state: TicketState;
  expires_at: string;
  created_at: string;
}

/** imageio's default when a ticket names none. */
export const DEFAULT_INACTIVITY_TIMEOUT_SECONDS = 60;
const REAP_INTERVAL_MS = 1000;
/** A DELETE waits this long at most for the ticket's requests in flight to end. */
const DRAIN_WAIT_MS = 30_000;
const DRAIN_POLL_MS = 20;
const TICKET_ID = /^[A-Za-z0-9._-]{1,128}$/;
const URL_PATTERN = /^vdi:([^?]+)(?:\?since=([^&]+))?$/;

type Row = Omit<Ticket, 'ops' | 'sparse' | 'dirty'> & { ops: string; sparse: number; dirty: number };

class TicketStore {
  constructor(private readonly db: Db) {}

  insert(t: Ticket): void {
    this.db
      .prepare(
        `INSERT INTO imageio_tickets (id, transfer_id, vdi_id, since, url, ops, size, timeout, inactivity_timeout,
           sparse, dirty, client_transfer_id, state, expires_at, created_at)
         VALUES (@id, @transfer_id, @vdi_id, @since, @url, @ops, @size, @timeout, @inactivity_timeout,
           @sparse, @dirty, @client_transfer_id, @state, @expires_at, @created_at)`,
      )
      .run({ ...t, ops: JSON.stringify(t.ops), sparse: t.sparse ? 1 : 0, dirty: t.dirty ? 1 : 0 });
  }

  get(id: string): Ticket | undefined {
    const r = this.db.prepare('SELECT * FROM imageio_tickets WHERE id = ?').get(id) as Row | undefined;
    return r && { ...r, ops: JSON.parse(r.ops), sparse: r.sparse === 1, dirty: r.dirty === 1 };
  }

  installed(): Ticket[] {
    const rows = this.db.prepare(`SELECT id FROM imageio_tickets WHERE state = 'installed'`).all() as {
      id: string;
    }[];
    return rows.map((r) => this.get(r.id)!);
  }

  save(t: Ticket): void {
    this.db
      .prepare(
        'UPDATE imageio_tickets SET state=@state, timeout=@timeout, expires_at=@expires_at WHERE id=@id',
      )
      .run({ id: t.id, state: t.state, timeout: t.timeout, expires_at: t.expires_at });
  }
}

/** What imageio's GET of a ticket answers, with the diskport session beside it. */
export interface TicketStatus {
  uuid: string;
  size: number;
  url: string;
  ops: TicketOp[];
  timeout: number;
  inactivity_timeout: number;
  sparse: boolean;
  dirty: boolean;
  transfer_id: string | null;
  active: boolean;
  canceled: boolean;
  connections: number;
  /** Unix time (seconds) at which the ticket expires. */
  expires: number;
  idle_time: number;
  transferred: number;
  diskport: { transfer: string; task_id: string; state: string; vdi: string; ticket_state: TicketState };
}

interface Activity {
  inflight: number;
  lastEnded: number;
  /**
   * The deadline the last request pushed on (ms), ahead of the saved
   * `expires_at`: saving it on every request would cost a commit each, so
   * it is saved only once less than half the timeout separates the saved
   * one from now (what a restart then reads).
   */
  deadline: number;
}

/**
 * The disk a ticket's reads see: the VDI's first `size` bytes, overlaid for
 * a write ticket with what it wrote. `unallocated()`: the ranges the VDI's
 * format leaves unallocated that no write covered (imageio's `hole`).
 */
export interface TicketImage {
  vdi: Vdi;
  image: BlockImage;
  /** Whether the bytes are the VDI's committed content only (a read ticket). */
  committed: boolean;
  unallocated(): Promise<ByteSpan[]>;
  close(): Promise<void>;
}

function positiveInt(name: string, v: unknown, min: number): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min) {
    throw new ApiError(
      'INVALID_REQUEST',
      `invalid value for '${name}': ${JSON.stringify(v)}; send an integer >= ${min}`,
    );
  }
  return v;
}

export class TicketService {
  private readonly store: TicketStore;
  private readonly activity = new Map<string, Activity>();
  private reaper: NodeJS.Timeout | null = null;

  constructor(
    db: Db,
    private readonly transfers: TransferService,
    private readonly vdis: VdiStore,
    private readonly tasks: TaskManager,
    private readonly logger?: Logger,
  ) {
    this.store = new TicketStore(db);
  }

  /** Ends tickets past their absolute deadline, so their VDI is free again (the session ttl handles idleness). */
  start(): void {
    // A round that fails (the metadata database away) is logged; the next one retries.
    this.reaper = setInterval(
      () => void this.reapExpired().catch((err) => this.logger?.error({ err }, 'expiring tickets failed')),
      REAP_INTERVAL_MS,
    );
    this.reaper.unref();
  }

  stop(): void {
    if (this.reaper) clearInterval(this.reaper);
  }

  async install(id: string, req: TicketRequest): Promise<TicketStatus> {
    if (!TICKET_ID.test(id)) {
      throw new ApiError(
        'INVALID_REQUEST',
        'a ticket id is 1 to 128 letters, digits, dots, dashes or underscores',
      );
    }
    if (req.uuid !== undefined && req.uuid !== id) {
      throw new ApiError(
        'INVALID_REQUEST',
        `the ticket's uuid '${req.uuid}' is not the id in the path '${id}'`,
      );
    }
    if (this.store.get(id)) {
      throw new ApiError('IMAGEIO_TICKET_EXISTS', `ticket ${id} exists already; a ticket id is used once`);
    }
    const m = URL_PATTERN.exec(req.url ?? '');
    if (!m) {
      throw new ApiError(
        'INVALID_REQUEST',
        `invalid value for 'url': ${JSON.stringify(req.url)}; name a VDI as vdi:{id} or vdi:{id}?since={snapshot}`,
      );
    }
    const ops = req.ops;
    if (!Array.isArray(ops) || ops.length === 0 || ops.some((op) => op !== 'read' && op !== 'write')) {
      throw new ApiError(
        'INVALID_REQUEST',
        `invalid value for 'ops': ${JSON.stringify(ops)}; send ["read"] or ["read","write"]`,
      );
    }
    const size = positiveInt('size', req.size, 0);
    const timeout = positiveInt('timeout', req.timeout, 1);
    const inactivity = positiveInt(
      'inactivity_timeout',
      req.inactivity_timeout ?? DEFAULT_INACTIVITY_TIMEOUT_SECONDS,
      1,
    );
    const dirty = req.dirty === true;
    const [, vdiId, since] = m;
    const vdi = this.vdis.get(vdiId);
    if (size > vdi.virtual_size) {
      throw new ApiError(
        'INVALID_REQUEST',
        `the ticket's size ${size} is larger than VDI ${vdi.id} (${vdi.virtual_size} bytes); a ticket covers at most the whole VDI: send its virtual size or less`,
        { size, virtual_size: vdi.virtual_size },
      );
    }
    const write = ops.includes('write');
    if (dirty && (write || !since)) {
      throw new ApiError(
        'INVALID_REQUEST',
        'a dirty ticket is a read ticket whose url names the snapshot it counts changes from: vdi:{id}?since={snapshot}',
      );
    }
    if (since) baseSnapshotOf(this.vdis, vdi, since);
    const { transfer } = await this.transfers.create(
      {
        vdi: vdi.id,
        direction: write ? 'upload' : 'download',
        format: 'raw',
        // The staging covers the whole VDI: what lies past a smaller ticket keeps the VDI's content.
        ...(write && { size: vdi.virtual_size }),
        ttl_seconds: Math.min(inactivity, 7 * 24 * 3600),
      },
      { in_place: write },
    );
    const now = Date.now();
    const ticket: Ticket = {
      id,
      transfer_id: transfer.id,
      vdi_id: vdi.id,
      since: since ?? null,
      url: req.url,
      ops: [...new Set(ops)],
      size,
      timeout,
      inactivity_timeout: inactivity,
      sparse: req.sparse !== false,
      dirty,
      client_transfer_id: req.transfer_id ?? null,
      state: 'installed',
      expires_at: new Date(now + timeout * 1000).toISOString(),
      created_at: new Date(now).toISOString(),
    };
    try {
      this.store.insert(ticket);
    } catch (err) {
      await this.transfers.cancel(transfer.id).catch(() => {});
      throw err;
    }
    return this.status(id);
  }

  /** The ticket as its management API shows it; 404 once deleted. */
  status(id: string): TicketStatus {
    const t = this.visible(id);
    const session = this.transfers.get(t.transfer_id);
    const act = this.activity.get(id);
    const inflight = act?.inflight ?? 0;
    const transferred =
      session.direction === 'upload'
        ? this.transfers.toJson(session).bytes_received
        : this.tasks.get(session.task_id).bytes_done;
    return {
      uuid: t.id,
      size: t.size,
      url: t.url,
      ops: t.ops,
      timeout: t.timeout,
      inactivity_timeout: t.inactivity_timeout,
      sparse: t.sparse,
      dirty: t.dirty,
      transfer_id: t.client_transfer_id,
      active: inflight > 0,
      canceled: t.state === 'canceled',
      connections: inflight,
      expires: Math.floor(this.expiresAt(t) / 1000),
      idle_time:
        inflight > 0 ? 0 : Math.floor((Date.now() - (act?.lastEnded ?? Date.parse(t.created_at))) / 1000),
      transferred,
      diskport: {
        transfer: t.transfer_id,
        task_id: session.task_id,
        state: session.state,
        vdi: t.vdi_id,
        ticket_state: t.state,
      },
    };
  }

  /** The ranges an upload ticket holds durably (what a restart keeps), [start, end) pairs. */
  received(id: string): ByteRange[] {
    const session = this.transfers.get(this.visible(id).transfer_id);
    return session.direction === 'upload' ? this.transfers.toJson(session).received : [];
  }

  /** PATCH {"timeout": N}: the ticket now expires N seconds from now. */
  extend(id: string, timeout: unknown): TicketStatus {
    const t = this.visible(id);
    t.timeout = positiveInt('timeout', timeout, 0);
    t.expires_at = new Date(Date.now() + t.timeout * 1000).toISOString();
    this.store.save(t);
    // The new deadline replaces the one requests pushed on, earlier or not, as in imageio.
    const act = this.activity.get(id);
    if (act) act.deadline = Date.parse(t.expires_at);
    if (t.state === 'installed') this.transfers.renew(t.transfer_id);
    return this.status(id);
  }

  /**
   * Commits an upload ticket (what it wrote laid over the VDI's content: an
   * in-place session), or ends a download ticket. Returns the session's task once started.
   */
  async finalize(id: string): Promise<Task> {
    const t = this.visible(id);
    const session = this.transfers.get(t.transfer_id);
    if (t.state === 'finalized') return this.tasks.get(session.task_id);
    if (t.state === 'installed' && (session.state === 'finalizing' || session.state === 'committed')) {
      // A crash came between the session's finalize and the ticket's record
      // of it: the finalize happened, and asking again is answered with it.
      t.state = 'finalized';
      this.store.save(t);
      return this.tasks.get(session.task_id);
    }
    if (t.state !== 'installed' || session.state !== 'open') {
      throw new ApiError(
        'TRANSFER_NOT_ACTIVE',
        `ticket ${id} is ${this.why(t, session)}; it cannot be finalized`,
      );
    }
    if (session.direction === 'download') {
      await this.transfers.cancel(session.id);
    } else {
      await this.transfers.flush(session.id);
      await this.transfers.beforeFinalize(session.id);
      this.transfers.finalize(session.id);
    }
    t.state = 'finalized';
    this.store.save(t);
    return this.tasks.get(session.task_id);
  }

  /** Waits for a finalize to end. */
  completion(id: string): Promise<Task> {
    const t = this.visible(id);
    return this.transfers.completion(t.transfer_id);
  }

  /**
   * DELETE: without `finalize`, cancels (an upload leaves the VDI as it was)
   * once the requests in flight have ended; with it, finalizes first and
   * waits for the commit. Deleting an unknown ticket does nothing, as in imageio.
   */
  async remove(id: string, finalize: boolean): Promise<Task | null> {
    const t = this.store.get(id);
    if (!t || t.state === 'deleted' || t.state === 'canceled') return null;
    let task: Task | null = null;
    if (finalize) {
      await this.finalize(id);
      task = await this.completion(id);
    } else if (t.state === 'installed') {
      t.state = 'canceled';
      this.store.save(t);
      const session = this.transfers.get(t.transfer_id);
      if (session.state === 'open') await this.transfers.cancel(session.id).catch(() => {});
      await this.drained(id);
      return this.tasks.get(session.task_id);
    }
    t.state = t.state === 'installed' || t.state === 'finalized' ? 'deleted' : t.state;
    this.store.save(t);
    return task;
  }

  /**
   * The ticket and its open session if `op` may be done through it now; 403
   * (what imageio clients take as "do not retry") otherwise.
   */
  async authorize(id: string, op?: TicketOp): Promise<{ ticket: Ticket; transfer: Transfer }> {
    const t = this.store.get(id);
    if (!t) throw forbidden(`no such ticket ${id}`);
    if (t.state === 'installed' && this.expiresAt(t) <= Date.now()) await this.expire(t);
    const session = this.transfers.get(t.transfer_id);
    if (t.state !== 'installed' || session.state !== 'open') {
      throw forbidden(`ticket ${id} is ${this.why(t, session)}`);
    }
    // As in imageio, write implies read: a read-write client may read back what it wrote.
    if (op && !t.ops.includes(op) && !(op === 'read' && t.ops.includes('write'))) {
      throw forbidden(`ticket ${id} forbids ${op}`);
    }
    return { ticket: t, transfer: session };
  }

  /**
   * The ticket's disk as a raw export to serve GETs from. Its validator
   * names the VDI's generation and the ticket's size; a write ticket's
   * content changes with every write, so its validator is new each time
   * (an If-Range never matches it).
   */
  async openExport(t: Ticket): Promise<ExportSource> {
    const ti = await this.openImage(t);
    try {
      const serialized = await codecFor('raw').serialize(ti.image);
      return {
        vdi: ti.vdi,
        format: 'raw',
        size: serialized.size,
        read: (start, end) => serialized.read(start, end),
        etag: ti.committed
          ? `"${ti.vdi.id}.g${ti.vdi.generation}.raw.ticket-${t.size}"`
          : `"ticket-${t.id}.${randomUUID()}"`,
        lastModified: new Date(ti.committed ? ti.vdi.content_updated_at : Date.now()),
        filename: `${t.id}.img`,
        close: () => ti.close(),
      };
    } catch (err) {
      await ti.close();
      throw err;
    }
  }

  /** The disk the ticket's reads see (TicketImage); close() it when done. */
  async openImage(t: Ticket): Promise<TicketImage> {
    const session = this.transfers.get(t.transfer_id);
    const lease = await this.vdis.images.lease(t.vdi_id);
    const layers: ChainLayer[] = [];
    try {
      let written: ByteSpan[] = [];
      if (session.direction === 'upload') {
        written = this.transfers.writtenRanges(session.id).map(([s, e]) => ({ start: s, length: e - s }));
        const staged = await RawFileImage.open(session.staging_path!, {
          virtualSize: lease.vdi.virtual_size,
        });
        layers.push({ image: staged, defined: written });
      }
      layers.push({ image: borrowed(lease), defined: [{ start: 0, length: t.size }] });
      const image = new ChainImage(t.size, layers);
      return {
        vdi: lease.vdi,
        image,
        committed: session.direction === 'download',
        unallocated: async () => {
          const holes = (await lease.image.unallocated?.()) ?? [];
          return subtract(holes, written, t.size);
        },
        close: async () => {
          await image.close();
          lease.release();
        },
      };
    } catch (err) {
      await Promise.all(layers.map((l) => l.image.close()));
      lease.release();
      throw err;
    }
  }

  /**
   * Counts a request on the ticket (its connections and idle time); call the
   * result when it ends, which pushes the ticket's deadline on.
   */
  track(t: Ticket): () => void {
    const a = this.activityOf(t);
    a.inflight++;
    let ended = false;
    return () => {
      if (ended) return;
      ended = true;
      a.inflight--;
      a.lastEnded = Date.now();
      this.touch(t, a);
    };
  }

  private activityOf(t: Ticket): Activity {
    let act = this.activity.get(t.id);
    if (!act) {
      act = { inflight: 0, lastEnded: Date.now(), deadline: Date.parse(t.expires_at) };
      this.activity.set(t.id, act);
    }
    return act;
  }

  /** imageio's touch: the ticket now expires `timeout` seconds from now (saved when the saved deadline is near). */
  private touch(t: Ticket, a: Activity): void {
    const now = Date.now();
    a.deadline = Math.max(a.deadline, now + t.timeout * 1000);
    if (Date.parse(t.expires_at) - now >= (t.timeout * 1000) / 2) return;
    try {
      const saved = this.store.get(t.id);
      if (saved?.state !== 'installed') return;
      saved.expires_at = new Date(a.deadline).toISOString();
      this.store.save(saved);
      t.expires_at = saved.expires_at;
    } catch (err) {
      this.logger?.error({ err, ticket: t.id }, 'saving a ticket deadline failed');
    }
  }

  /** When the ticket expires (ms): its saved deadline, or the later one its last request set. */
  private expiresAt(t: Ticket): number {
    return Math.max(Date.parse(t.expires_at), this.activity.get(t.id)?.deadline ?? 0);
  }

  async reapExpired(): Promise<void> {
    for (const t of this.store.installed()) {
      if (this.expiresAt(t) > Date.now()) continue;
      await this.expire(t).catch((err) =>
        this.logger?.error({ err, ticket: t.id }, 'expiring a ticket failed'),
      );
    }
  }

  private async expire(t: Ticket): Promise<void> {
    t.state = 'expired';
    this.store.save(t);
    this.logger?.info({ ticket: t.id, transfer: t.transfer_id }, 'imageio ticket expired');
    await this.transfers.expire(
      t.transfer_id,
      `ticket ${t.id} expired ${t.timeout} s after it was installed, extended or last used`,
    );
  }

  private visible(id: string): Ticket {
    const t = this.store.get(id);
    if (!t || t.state === 'deleted' || t.state === 'canceled') {
      throw new ApiError('IMAGEIO_TICKET_NOT_FOUND', `no ticket with id '${id}'`, { id });
    }
    return t;
  }

  private why(t: Ticket, session: Transfer): string {
    if (t.state !== 'installed') return t.state;
    return session.state === 'cancelled' ? 'canceled' : session.state;
  }

  /** Waits until no request of the ticket is in flight (DELETE: they end with the session). */
  private async drained(id: string): Promise<void> {
    const deadline = Date.now() + DRAIN_WAIT_MS;
    while ((this.activity.get(id)?.inflight ?? 0) > 0 && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, DRAIN_POLL_MS));
    }
  }
}

function forbidden(reason: string): ApiError {
  return new ApiError('IMAGEIO_TICKET_FORBIDDEN', `You are not allowed to access this resource: ${reason}`);
}

/** The VDI's image through a lease the chain does not own: closing the chain leaves it to the lease. */
function borrowed(lease: ImageLease): BlockImage {
  const { image } = lease;
  return {
    virtualSize: image.virtualSize,
    read: (offset, length) => image.read(offset, length),
    readInto: (buf, offset) => image.readInto(buf, offset),
    extents: (): Promise<Extent[]> => lease.extents(),
    close: async () => {},
  };
}

/** The parts of `spans` (ordered) below `size` that `minus` (ordered, merged) does not cover. */
function subtract(spans: readonly ByteSpan[], minus: readonly ByteSpan[], size: number): ByteSpan[] {
  const out: ByteSpan[] = [];
  let k = 0;
  for (const span of spans) {
    let pos = span.start;
    const end = Math.min(span.start + span.length, size);
    while (k < minus.length && minus[k].start + minus[k].length <= pos) k++;
    for (let j = k; j < minus.length && minus[j].start < end && pos < end; j++) {
      if (minus[j].start > pos) out.push({ start: pos, length: minus[j].start - pos });
      pos = Math.max(pos, minus[j].start + minus[j].length);
    }
    if (pos < end) out.push({ start: pos, length: end - pos });
  }
  return out;
}
