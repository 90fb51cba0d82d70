/**
 * The receiving side of a set migration (xapi's `VM.migrate_receive`).
 *
 * `POST /v1/migrations/receive` opens an incoming migration and answers an
 * opaque token: base64url of `{url, id, secret}`. The secret (its hash kept
 * here) authorizes /v1/migrations/{id}/... and nothing else: reading the SRs
 * it may write to, creating VDIs, writing them through imageio write tickets
 * (ranges land in staging, unwritten ranges keep the VDI's content, the
 * commit is atomic), then committing or aborting the whole migration. No
 * management token crosses to the source.
 *
 * All-or-nothing: the VDIs made under a migration are ordinary VDIs only
 * once it commits; an abort, or an expiry before the commit, deletes them.
 */
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import type { Logger } from 'pino';
import { ApiError, NotFoundError } from '../errors.js';
import { safeEqual } from '../secrets.js';
import { type Db, nowIso } from '../storage/db.js';
import type { SrStore } from '../storage/srs.js';
import type { CreateVdi, Vdi, VdiStore } from '../storage/vdis.js';
import type { TicketService } from './imageio-tickets.js';
import type { ByteRange } from './range-set.js';

export const DEFAULT_RECEIVE_TTL_SECONDS = 3600;
const REAP_INTERVAL_MS = 30_000;
/** A write ticket's absolute timeout: generous, the migration's expiry bounds it. */
const TICKET_TIMEOUT_SECONDS = 24 * 3600;

export interface IncomingMigration {
  id: string;
  secret_hash: string;
  sr_id: string | null;
  state: 'open' | 'committed' | 'aborted';
  expires_at: string;
  created_at: string;
}

/** What the token carries. */
export interface ReceiveToken {
  url: string;
  id: string;
  secret: string;
}

export function encodeReceiveToken(t: ReceiveToken): string {
  return Buffer.from(JSON.stringify({ v: 1, ...t })).toString('base64url');
}

export function decodeReceiveToken(token: unknown): ReceiveToken {
  try {
    const t = JSON.parse(Buffer.from(String(token), 'base64url').toString('utf8'));
    if (t?.v === 1 && typeof t.url === 'string' && typeof t.id === 'string' && typeof t.secret === 'string') {
      new URL(t.url);
      return { url: t.url, id: t.id, secret: t.secret };
    }
  } catch {
    // falls through
  }
  throw new ApiError(
    'MIGRATION_TOKEN_INVALID',
    'dest is not a receive token: ask the destination diskport for one (POST /v1/migrations/receive) and pass it whole',
  );
}

const hash = (secret: string) => createHash('sha256').update(secret).digest('hex');

export class MigrationReceiver {
  private timer?: NodeJS.Timeout;

  constructor(
    private readonly db: Db,
    private readonly srs: SrStore,
    private readonly vdis: VdiStore,
    private readonly tickets: TicketService,
    private readonly logger: Logger,
  ) {}

  start(): void {
    const reap = () =>
      void this.reapExpired().catch((err) => this.logger.error({ err }, 'migration expiry failed'));
    reap();
    this.timer = setInterval(reap, REAP_INTERVAL_MS);
    this.timer.unref();
  }

  stop(): void {
    clearInterval(this.timer);
  }

  /** Opens an incoming migration; `url` is this service's address as the caller reached it. */
  open(
    url: string,
    req: { sr?: string; ttl_seconds?: number },
  ): { token: string; migration: IncomingMigration } {
    if (req.sr !== undefined) this.srs.get(req.sr);
    const secret = randomBytes(32).toString('base64url');
    const now = new Date();
    const m: IncomingMigration = {
      id: randomUUID(),
      secret_hash: hash(secret),
      sr_id: req.sr ?? null,
      state: 'open',
      expires_at: new Date(
        now.getTime() + (req.ttl_seconds ?? DEFAULT_RECEIVE_TTL_SECONDS) * 1000,
      ).toISOString(),
      created_at: now.toISOString(),
    };
    this.db
      .prepare(
        `INSERT INTO migrations_in (id, secret_hash, sr_id, state, expires_at, created_at)
         VALUES (@id, @secret_hash, @sr_id, @state, @expires_at, @created_at)`,
      )
      .run(m);
    return { token: encodeReceiveToken({ url, id: m.id, secret }), migration: m };
  }

  get(id: string): IncomingMigration {
    const m = this.db.prepare('SELECT * FROM migrations_in WHERE id = ?').get(id) as
      | IncomingMigration
      | undefined;
    if (!m) throw new NotFoundError('migration', id);
    return m;
  }

  /** True when `secret` is the credential of migration `id` (unknown ids: false). */
  secretMatches(id: string, secret: string): boolean {
    const m = this.db.prepare('SELECT secret_hash FROM migrations_in WHERE id = ?').get(id) as
      | { secret_hash: string }
      | undefined;
    return m !== undefined && safeEqual(m.secret_hash, hash(secret));
  }

  vdiIds(id: string): string[] {
    return (
      this.db.prepare('SELECT vdi_id FROM migration_in_vdis WHERE migration_id = ? ORDER BY seq').all(id) as {
        vdi_id: string;
      }[]
    ).map((r) => r.vdi_id);
  }

  /** The migration, refused unless it still takes changes. */
  open_(id: string): IncomingMigration {
    const m = this.get(id);
    if (m.state !== 'open' || m.expires_at <= nowIso()) {
      throw new ApiError(
        'MIGRATION_NOT_OPEN',
        `incoming migration ${id} is ${m.state === 'open' ? 'expired' : m.state}; ask the destination for a new receive token`,
        { migration: id, state: m.state },
      );
    }
    return m;
  }

  async createVdi(id: string, req: CreateVdi): Promise<Vdi> {
    const m = this.open_(id);
    const vdi = await this.vdis.create({ ...req, sr: req.sr ?? m.sr_id ?? undefined });
    this.db.prepare('INSERT INTO migration_in_vdis (migration_id, vdi_id) VALUES (?, ?)').run(id, vdi.id);
    return vdi;
  }

  /** A VDI of this migration (404 for any other: the credential reaches no further). */
  vdiOf(id: string, vdiId: string): Vdi {
    if (!this.vdiIds(id).includes(vdiId)) throw new NotFoundError('vdi', vdiId);
    return this.vdis.get(vdiId);
  }

  /**
   * Installs a write ticket on one of the migration's VDIs; returns its id.
   * The source may choose the id (a fresh UUID it journaled first), so that
   * after a restart it finds the ticket again, or knows it was never made.
   */
  async ticket(id: string, vdiId: string, chosen?: string): Promise<string> {
    this.open_(id);
    const vdi = this.vdiOf(id, vdiId);
    const ticketId = chosen ?? randomUUID();
    await this.tickets.install(ticketId, {
      uuid: ticketId,
      size: vdi.virtual_size,
      url: `vdi:${vdi.id}`,
      ops: ['write'],
      timeout: TICKET_TIMEOUT_SECONDS,
      inactivity_timeout: 600,
      sparse: true,
    });
    return ticketId;
  }

  /** Commits a ticket's writes into its VDI (all of them or none) and waits for the commit. */
  async finalizeTicket(id: string, ticketId: string): Promise<Record<string, unknown>> {
    this.open_(id);
    const vdiId = this.tickets.status(ticketId).diskport.vdi;
    this.vdiOf(id, vdiId);
    await this.tickets.finalize(ticketId);
    const task = await this.tickets.completion(ticketId);
    if (task.status !== 'success') {
      throw new ApiError('REMOTE_IMPORT_FAILED', `the write to VDI ${vdiId} failed: ${task.error?.message}`, {
        task: task.id,
        error: task.error,
      });
    }
    return { vdi: vdiId, task: task.id, generation: task.result?.generation ?? null };
  }

  /**
   * What a write ticket of the migration holds: a source that restarted (or
   * whose destination did) sends only what is missing.
   */
  holding(
    id: string,
    ticketId: string,
  ): { ticket: string; vdi: string; state: string; received: ByteRange[] } {
    this.get(id);
    const status = this.tickets.status(ticketId);
    // Another migration's ticket, or anyone else's, is as unknown as one that never was.
    if (!this.vdiIds(id).includes(status.diskport.vdi)) {
      throw new ApiError('IMAGEIO_TICKET_NOT_FOUND', `no ticket with id '${ticketId}'`, { id: ticketId });
    }
    return {
      ticket: ticketId,
      vdi: status.diskport.vdi,
      state: status.diskport.state,
      received: this.tickets.received(ticketId),
    };
  }

  commit(id: string): IncomingMigration {
    this.open_(id);
    this.db.prepare("UPDATE migrations_in SET state = 'committed' WHERE id = ?").run(id);
    return this.get(id);
  }

  /** Deletes every VDI made under the migration; nothing of it stays. */
  async abort(id: string): Promise<IncomingMigration> {
    const m = this.get(id);
    if (m.state === 'committed') {
      throw new ApiError(
        'MIGRATION_NOT_OPEN',
        `incoming migration ${id} has committed; its VDIs are ordinary VDIs now`,
        {
          migration: id,
          state: m.state,
        },
      );
    }
    this.db.prepare("UPDATE migrations_in SET state = 'aborted' WHERE id = ?").run(id);
    for (const vdiId of this.vdiIds(id)) await this.removeVdi(vdiId);
    return this.get(id);
  }

  private async removeVdi(vdiId: string): Promise<void> {
    const tickets = this.db
      .prepare("SELECT id FROM imageio_tickets WHERE vdi_id = ? AND state IN ('installed', 'finalized')")
      .all(vdiId) as { id: string }[];
    for (const t of tickets) await this.tickets.remove(t.id, false).catch(() => {});
    for (let attempt = 0; ; attempt++) {
      try {
        await this.vdis.delete(vdiId);
        return;
      } catch (err) {
        const code = (err as ApiError).code;
        if (code === 'VDI_NOT_FOUND') return;
        // A ticket's commit still running: it ends shortly.
        if (code !== 'VDI_BUSY' || attempt >= 50) throw err;
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  }

  /** Open migrations past their expiry are aborted: their VDIs removed. */
  async reapExpired(): Promise<void> {
    const rows = this.db
      .prepare("SELECT id FROM migrations_in WHERE state = 'open' AND expires_at <= ?")
      .all(nowIso()) as { id: string }[];
    for (const { id } of rows) await this.abort(id);
  }

  toJson(m: IncomingMigration) {
    return {
      id: m.id,
      state: m.state,
      sr: m.sr_id,
      expires_at: m.expires_at,
      created_at: m.created_at,
      vdis: this.vdiIds(m.id),
    };
  }
}
