/**
 * Resumable transfer sessions:
 *   POST   /v1/transfers                 open a session
 *   GET    /v1/transfers[/{id}]          state, with the ranges received
 *   PUT    /v1/transfers/{id}/data       a chunk (Content-Range) or the whole stream; ?flush=n defers durability
 *   PATCH  /v1/transfers/{id}/data       {"op": "zero"}: a range of zeros, no bytes sent; {"op": "flush"}
 *   HEAD   /v1/transfers/{id}/data       Upload-Offset / Upload-Length (or export headers)
 *   GET    /v1/transfers/{id}/data       a download session's bytes, with ranges
 *   POST   /v1/transfers/{id}/finalize   commit an upload, as a task
 *   DELETE /v1/transfers/{id}            cancel
 */
import { type Request, type Response, Router } from 'express';
import { ApiError } from '../errors.js';
import { continueNow } from '../http/continue.js';
import { leanReadWithin } from '../http/lean-read.js';
import { validateBody } from '../http/openapi.js';
import { pageParams, sendPage } from '../http/paging.js';
import { flushParam } from '../http/params.js';
import { type SessionExport, sendExport } from '../http/send-export.js';
import { requireTransferCredential } from '../http/transfer-auth.js';
import { parseContentDigest, parseContentRange } from '../http/transfer-headers.js';
import type { Services } from '../services.js';
import { startPull } from '../transfer/pull.js';
import { startPush } from '../transfer/push.js';
import type { CreateTransfer } from '../transfer/sessions.js';
import type { Transfer } from '../transfer/transfer-store.js';

function baseUrl(req: Request): string {
  return `${req.protocol}://${req.get('host')}`;
}

/** The session named in the path, checked against the token when one authorized the request. */
function transferOf(s: Services, req: Request, res: Response): Transfer {
  const t = s.transfers.get(req.params.id as string);
  return (res.locals.transfer as Transfer | undefined) ?? t;
}

export function transferRoutes(s: Services): Router {
  const needCredential = requireTransferCredential(s.config.token);
  return Router()
    .post('/v1/transfers', async (req, res) => {
      const body = validateBody<CreateTransfer & { source_url?: string; target_url?: string }>(
        'TransferCreate',
        req.body,
      );
      if (body.source_url && body.target_url) {
        throw new ApiError(
          'INVALID_REQUEST',
          'a transfer pulls (source_url) or pushes (target_url), not both',
        );
      }
      const { transfer, token } = body.source_url
        ? await startPull(s, { ...body, source_url: body.source_url })
        : body.target_url
          ? await startPush(s, { ...body, target_url: body.target_url })
          : await s.transfers.create(body);
      res
        .status(201)
        .location(`/v1/transfers/${transfer.id}`)
        .json(s.transfers.toJson(transfer, { token, baseUrl: baseUrl(req) }));
    })
    .get('/v1/transfers', (req, res) => {
      const vdi = typeof req.query.vdi === 'string' && req.query.vdi ? req.query.vdi : undefined;
      const page = s.transfers.listPage({ vdi, active: req.query.active === 'true' }, pageParams(req));
      sendPage(req, res, { ...page, items: page.items.map((t) => s.transfers.toJson(t)) });
    })
    .get('/v1/transfers/:id', async (req, res) => {
      const t = transferOf(s, req, res);
      await s.transfers.settledUploadState(t.id);
      // Every request renews the session, a look at its state too.
      s.transfers.renew(t.id);
      res.json(s.transfers.toJson(t));
    })
    .delete('/v1/transfers/:id', async (req, res) => {
      res.json(s.transfers.toJson(await s.transfers.cancel(transferOf(s, req, res).id)));
    })
    .post('/v1/transfers/:id/finalize', async (req, res) => {
      const t = transferOf(s, req, res);
      await s.transfers.beforeFinalize(t.id);
      const started = s.transfers.finalize(t.id);
      const wait = Number(req.query.wait ?? 0);
      const task = wait > 0 ? await s.tasks.wait(started.id, Math.min(wait, 300)) : started;
      res.status(202).location(`/v1/tasks/${task.id}`).json(task);
    })
    .put('/v1/transfers/:id/data', needCredential, async (req, res) => {
      const t = transferOf(s, req, res);
      const flush = flushParam(req.query.flush);
      const rangeHeader = req.get('content-range');
      const range = rangeHeader ? parseContentRange(rangeHeader) : undefined;
      const digestHeader = req.get('content-digest');
      const digest = digestHeader ? (parseContentDigest(digestHeader) ?? undefined) : undefined;
      const length = req.get('content-length');
      if (
        range &&
        range.end >= range.start &&
        length !== undefined &&
        Number(length) !== range.end - range.start + 1
      ) {
        throw new ApiError(
          'INVALID_CONTENT_RANGE',
          `Content-Length ${length} does not match Content-Range ${rangeHeader} (${range.end - range.start + 1} bytes)`,
        );
      }
      // `bytes */total` with no body only declares the length.
      const after =
        range && range.end < range.start
          ? await s.transfers.declareTotal(t.id, range.total!)
          : await s.transfers.write(t.id, req, { range, digest, flush, beforeBody: () => continueNow(res) });
      const state = s.transfers.uploadState(after.id);
      res.setHeader('Upload-Offset', String(state.offset));
      if (state.length !== null) res.setHeader('Upload-Length', String(state.length));
      res.json(s.transfers.toJson(after));
    })
    .patch('/v1/transfers/:id/data', needCredential, async (req, res) => {
      // ovirt-imageio's PATCH: {"op": "zero", "offset", "size"} marks a range as zeros, no bytes
      // sent; {"op": "flush"} makes every byte written so far durable (a flush point).
      const op = validateBody<{ op: 'zero' | 'flush'; offset?: number; size?: number; flush?: boolean }>(
        'TransferDataOp',
        req.body,
      );
      const t = transferOf(s, req, res);
      let after: Transfer;
      if (op.op === 'flush') after = await s.transfers.flush(t.id);
      else {
        if (op.size === undefined) {
          throw new ApiError(
            'INVALID_REQUEST',
            'invalid request: a zero operation needs size (and offset, default 0)',
          );
        }
        const offset = op.offset ?? 0;
        after =
          op.size > 0
            ? await s.transfers.zero(
                t.id,
                { start: offset, end: offset + op.size - 1, total: null },
                op.flush ?? true,
              )
            : s.transfers.get(t.id);
      }
      const state = s.transfers.uploadState(after.id);
      res.setHeader('Upload-Offset', String(state.offset));
      if (state.length !== null) res.setHeader('Upload-Length', String(state.length));
      res.json(s.transfers.toJson(after));
    })
    .head('/v1/transfers/:id/data', needCredential, async (req, res) => {
      const t = transferOf(s, req, res);
      if (t.direction === 'download') return serveDownload(s, req, res, t);
      const state = await s.transfers.settledUploadState(t.id);
      // A client asking where to resume is active: the session must still be there for its next chunk.
      s.transfers.renew(t.id);
      res.setHeader('Upload-Offset', String(state.offset));
      if (state.length !== null) res.setHeader('Upload-Length', String(state.length));
      res.setHeader('Cache-Control', 'no-store');
      res.status(200).end();
    })
    .get('/v1/transfers/:id/data', needCredential, async (req, res) => {
      const t = transferOf(s, req, res);
      if (t.direction !== 'download') {
        throw new ApiError(
          'WRONG_DIRECTION',
          `transfer ${t.id} is an upload; GET its state at /v1/transfers/${t.id}`,
        );
      }
      await serveDownload(s, req, res, t);
    });
}

async function serveDownload(s: Services, req: Request, res: Response, t: Transfer): Promise<void> {
  if (t.state !== 'open') throw new ApiError('TRANSFER_NOT_ACTIVE', `transfer ${t.id} is ${t.state}`);
  // Renewed in memory, saved at most every so often: a ranged GET each second would otherwise commit each.
  s.transfers.keepAlive(t.id);
  const session: SessionExport = {
    taskId: t.task_id,
    onBytes: (n) => s.transfers.countServed(t.id, n),
    onReadFailed: (err) => {
      s.transfers
        .failDownload(t.id, err)
        .catch((e) => req.log?.error({ err: e, transfer: t.id }, 'ending a failed download session failed'));
    },
  };
  await (leanReadWithin(s, req, res, t.vdi_id, t.format, session) ??
    sendExport(s, req, res, t.vdi_id, t.format, session));
}
