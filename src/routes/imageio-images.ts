/**
 * ovirt-imageio's data API (docs/images.md), the ticket id its only credential:
 *   OPTIONS /images/{ticket}|*              Allow and features
 *   GET     /images/{ticket}                the image, or one Range of it
 *   PUT     /images/{ticket}[?flush=y|n]    Content-Range bytes s-e/*, or the whole image
 *   PATCH   /images/{ticket}                {"op":"zero",...} | {"op":"flush"}
 *   GET     /images/{ticket}/extents?context=zero|dirty
 *   GET     /images/{ticket}/checksum?algorithm=&block_size=
 *   GET     /images/{ticket}/checksum/algorithms
 */
import express, { type Request, type Response, Router } from 'express';
import { ApiError } from '../errors.js';
import { continueNow } from '../http/continue.js';
import { assertSingleRange, imageioErrors, parsePatch, putRange, starTotal } from '../http/imageio.js';
import { leanReadWithin } from '../http/lean-read.js';
import { flushParam } from '../http/params.js';
import { type SessionExport, sendExport, sendSource } from '../http/send-export.js';
import { BLKHASH_ALGORITHMS, blkhashImage, parseBlkhashParams } from '../ops/blkhash.js';
import { imageioDirtyExtents } from '../ops/dirty-extents.js';
import { cutAt, withHoles } from '../ops/extents.js';
import type { Services } from '../services.js';
import type { Ticket, TicketImage, TicketOp } from '../transfer/imageio-tickets.js';

/** Parallel connections a ticket may use (the file backend takes any number; these keep the SR fair). */
export const IMAGEIO_MAX_READERS = 8;
export const IMAGEIO_MAX_WRITERS = 8;
const ALL_FEATURES = ['extents', 'zero', 'flush', 'checksum'];
const EXTENT_CONTEXTS = ['zero', 'dirty'];

/** Authorizes the request's ticket for `op`, counts it as a connection while it runs, and keeps the session alive. */
async function ticketFor(s: Services, req: Request, res: Response, op?: TicketOp): Promise<Ticket> {
  const { ticket } = await s.tickets.authorize(req.params.ticket as string, op);
  res.locals.imageioSize = ticket.size;
  const done = s.tickets.track(ticket);
  res.once('close', done);
  s.transfers.keepAlive(ticket.transfer_id);
  return ticket;
}

/** Runs `use` on the disk the ticket's reads see, closing it after. */
async function withImage<T>(s: Services, t: Ticket, use: (ti: TicketImage) => Promise<T>): Promise<T> {
  const ti = await s.tickets.openImage(t);
  try {
    return await use(ti);
  } finally {
    await ti.close();
  }
}

export function imageioImageRoutes(s: Services): Router {
  const unixSocket = s.config.imageioSocket;
  const options = (features: string[], allow: string[], t?: Ticket) => ({
    allow: allow.join(','),
    body: {
      features,
      max_readers: IMAGEIO_MAX_READERS,
      max_writers: IMAGEIO_MAX_WRITERS,
      ...(unixSocket && { unix_socket: unixSocket }),
      // What newer imageio servers add for a ticket: its clients take the size from here.
      ...(t && { transfer_format: 'raw', virtual_size: t.size }),
    },
  });
  // imageio clients send PATCH bodies as JSON whatever their Content-Type (curl --data-binary).
  const json = express.json({ limit: '64kb', strict: true, type: () => true });
  return Router()
    .get('/images/:ticket/checksum/algorithms', (_req, res) => {
      res.json({ algorithms: BLKHASH_ALGORITHMS });
    })
    .options('/images/:ticket', async (req, res) => {
      let o: ReturnType<typeof options>;
      if (req.params.ticket === '*') o = options(ALL_FEATURES, ['OPTIONS', 'GET', 'PUT', 'PATCH']);
      else {
        const t = await ticketFor(s, req, res);
        // Write implies read, as in imageio.
        o = t.ops.includes('write')
          ? options(ALL_FEATURES, ['OPTIONS', 'GET', 'PUT', 'PATCH'], t)
          : options(['extents', 'checksum'], ['OPTIONS', 'GET'], t);
      }
      res.setHeader('Allow', o.allow);
      res.json(o.body);
    })
    .get('/images/:ticket', async (req, res) => {
      const t = await ticketFor(s, req, res, 'read');
      assertSingleRange(req, t.size);
      starTotal(res);
      const session = s.transfers.get(t.transfer_id);
      if (session.direction === 'upload') {
        // Reading back through a write ticket: the bytes count toward nothing (imageio reports no transferred for it).
        const readBack: SessionExport = {
          taskId: session.task_id,
          onBytes: () => {},
          onReadFailed: (err) => req.log?.warn({ err, ticket: t.id }, 'a read through a write ticket failed'),
        };
        await sendSource(s, req, res, await s.tickets.openExport(t), readBack);
        return;
      }
      const download: SessionExport = {
        taskId: session.task_id,
        onBytes: (n) => s.transfers.countServed(t.transfer_id, n),
        onReadFailed: (err) => {
          s.transfers
            .failDownload(t.transfer_id, err)
            .catch((e) => req.log?.error({ err: e, ticket: t.id }, 'ending a failed download ticket failed'));
        },
      };
      if (t.size === s.vdis.get(t.vdi_id).virtual_size) {
        await (leanReadWithin(s, req, res, t.vdi_id, 'raw', download) ??
          sendExport(s, req, res, t.vdi_id, 'raw', download));
      } else await sendSource(s, req, res, await s.tickets.openExport(t), download);
    })
    .put('/images/:ticket', async (req, res) => {
      const t = await ticketFor(s, req, res, 'write');
      const flush = flushParam(req.query.flush);
      const range = putRange(req, t.size);
      if (range !== 'empty') {
        // As on imageio's disk, the last write of a byte wins.
        await s.transfers.write(t.transfer_id, req, {
          range,
          flush,
          overwrite: true,
          beforeBody: () => continueNow(res),
        });
      }
      res.status(200).end();
    })
    .patch('/images/:ticket', json, async (req, res) => {
      const t = await ticketFor(s, req, res, 'write');
      const op = parsePatch(req.body, t.size);
      if (op.op === 'flush') await s.transfers.flush(t.transfer_id);
      else if (op.size > 0) {
        await s.transfers.zero(
          t.transfer_id,
          { start: op.offset, end: op.offset + op.size - 1, total: null },
          op.flush,
          true,
        );
      }
      res.status(200).end();
    })
    .get('/images/:ticket/extents', async (req, res) => {
      const context = req.query.context ?? 'zero';
      if (typeof context !== 'string' || !EXTENT_CONTEXTS.includes(context)) {
        throw new ApiError(
          'INVALID_REQUEST',
          `Invalid value for 'context': '${String(context)}'; use zero or dirty`,
        );
      }
      const t = await ticketFor(s, req, res, 'read');
      if (context === 'dirty') {
        if (!t.dirty) {
          throw new ApiError(
            'DIRTY_EXTENTS_UNAVAILABLE',
            `ticket ${t.id} is not part of an incremental backup; install it with dirty: true and url vdi:{id}?since={snapshot}`,
          );
        }
        res.json(cutAt(await imageioDirtyExtents(s.vdis, t.vdi_id, t.since!), t.size));
        return;
      }
      const extents = await withImage(s, t, async (ti) => {
        const [all, unallocated] = await Promise.all([ti.image.extents(), ti.unallocated()]);
        return withHoles(all, unallocated);
      });
      res.json(extents);
    })
    .get('/images/:ticket/checksum', async (req, res) => {
      const params = parseBlkhashParams(req.query.algorithm, req.query.block_size);
      const t = await ticketFor(s, req, res, 'read');
      // A write ticket's image is the VDI as its writes so far leave it; a read ticket's is the VDI.
      res.json(await withImage(s, t, async (ti) => blkhashImage(ti.image, await ti.image.extents(), params)));
    })
    .use(imageioErrors((req) => req.res?.locals.imageioSize as number | undefined));
}
