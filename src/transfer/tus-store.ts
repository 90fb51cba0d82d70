/**
 * tus 1.0 uploads (https://tus.io/protocols/resumable-upload) as transfer
 * sessions: the @tus/server DataStore over TransferService. A tus upload is an
 * upload session and its id is the transfer id, so `GET /v1/transfers/{id}`,
 * its task, cancel and expiry all apply to it.
 *
 * `Upload-Metadata` carries `vdi` (required), `format` (raw, vhd or qcow2;
 * default raw) and optionally `checksum` (`sha256:<hex>` of the whole stream,
 * verified before the commit). `Upload-Length` is the size of the stream, as
 * `size` is for a session. A PATCH may end anywhere: the bytes that arrived
 * are kept and Upload-Offset moves past them. The per-request checksum
 * (`Upload-Checksum`) is parsed by the route and reaches `write()` through
 * `tusRequest`; a mismatch discards that request's bytes (460).
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import type { Readable } from 'node:stream';
import { finished } from 'node:stream/promises';
import { DataStore, Upload } from '@tus/utils';
import { ApiError, INTERNAL_ERROR_MESSAGE, isErrorCode } from '../errors.js';
import type { Task } from '../tasks/task-store.js';
import { type ChunkWrite, DEFAULT_TTL_SECONDS, type TransferService } from './sessions.js';
import type { Transfer } from './transfer-store.js';

export const TUS_EXTENSIONS = ['creation', 'creation-with-upload', 'termination', 'checksum', 'expiration'];

/** What the route knows about the request being handled, for the store (which only sees a stream). */
export interface TusRequestContext {
  digest?: ChunkWrite['digest'];
  /** The failure behind an error response, for the log. */
  error?: unknown;
  /** The request's id, which a 5xx answer names (the log files its cause under it). */
  requestId?: string;
}
export const tusRequest = new AsyncLocalStorage<TusRequestContext>();

export class TransferTusStore extends DataStore {
  constructor(private readonly transfers: TransferService) {
    super();
    this.extensions = TUS_EXTENSIONS;
  }

  /** POST: opens an upload session; the session's id becomes the upload's (and so its URL). */
  override async create(upload: Upload): Promise<Upload> {
    const metadata = upload.metadata ?? {};
    if (!metadata.vdi) {
      throw new ApiError(
        'VDI_REQUIRED',
        "Upload-Metadata must name the VDI to import into: 'vdi <base64 of the VDI id>' (and optionally 'format', 'checksum', 'base')",
      );
    }
    // The client's metadata, as it sent it (a key without a value reads back as one with an empty value).
    const kept = Object.fromEntries(Object.entries(metadata).map(([key, value]) => [key, value ?? '']));
    const { transfer } = await this.transfers.create(
      {
        vdi: metadata.vdi,
        direction: 'upload',
        format: metadata.format || 'raw',
        size: upload.size,
        checksum: metadata.checksum || undefined,
        base: metadata.base || undefined,
      },
      { origin: 'tus', metadata: kept },
    );
    // PostHandler reads the id back from `upload` for the Location header and the body it writes.
    upload.id = transfer.id;
    upload.creation_date = transfer.created_at;
    return upload;
  }

  /** HEAD (and every PATCH first): the offset is what is durably received, contiguously from 0. */
  override async getUpload(id: string): Promise<Upload> {
    const t = this.session(id);
    const { offset, length } = await this.transfers.settledUploadState(id);
    // A client that sees offset == length takes the upload as done, so that
    // must mean committed: a complete upload whose commit never ran (a crash
    // after its last byte) or is still running is committed first, and a
    // failed commit is answered as such.
    if (length !== null && offset === length && t.state !== 'committed') await this.commit(id);
    return new Upload({
      id,
      offset,
      size: length ?? undefined,
      metadata: t.metadata ?? undefined,
      // @tus/server expires an upload at creation_date + getExpiration(); sessions
      // slide their expiry on activity, so report the last activity as the start.
      creation_date: new Date(Date.parse(t.expires_at) - this.getExpiration()).toISOString(),
    });
  }

  /** PATCH: the body lands at `offset`; it may stop short of the end. Returns the new offset. */
  override async write(stream: Readable, id: string, offset: number): Promise<number> {
    const { length } = this.transfers.uploadState(id);
    if (length === null || offset >= length) {
      await finished(stream.resume());
      return offset;
    }
    const digest = tusRequest.getStore()?.digest;
    try {
      await this.transfers.write(id, stream, {
        range: { start: offset, end: length - 1, total: length },
        partial: true,
        digest,
      });
    } catch (err) {
      if (err instanceof ApiError && err.code === 'DIGEST_MISMATCH') {
        throw new ApiError(
          'UPLOAD_CHECKSUM_MISMATCH',
          `the body does not match its Upload-Checksum (${digest?.algorithm}); its bytes were discarded: send them again from Upload-Offset ${offset}`,
        );
      }
      throw err;
    }
    return this.transfers.uploadState(id).offset;
  }

  override async declareUploadLength(id: string, length: number): Promise<void> {
    await this.transfers.declareTotal(id, length);
  }

  /** DELETE: cancels the session; the VDI stays as it was. */
  override async remove(id: string): Promise<void> {
    this.session(id);
    await this.transfers.cancel(id);
  }

  /** The last byte arrived: commit (validate, convert, rename) and answer only once that is done. */
  async commit(id: string): Promise<Task> {
    if (this.transfers.get(id).state === 'open') this.transfers.finalize(id);
    const task = await this.transfers.completion(id);
    if (task.status === 'success') return task;
    const error = task.error ?? { code: 'INTERNAL_ERROR', message: INTERNAL_ERROR_MESSAGE };
    throw new ApiError(isErrorCode(error.code) ? error.code : 'INTERNAL_ERROR', error.message, {
      task_id: task.id,
    });
  }

  override async deleteExpired(): Promise<number> {
    const expired = this.transfers
      .list({ active: true })
      .filter((t) => t.state === 'open' && this.transfers.isExpired(t));
    await this.transfers.reapExpired();
    return expired.length;
  }

  /** Sessions expire DEFAULT_TTL_SECONDS after their last activity. */
  override getExpiration(): number {
    return DEFAULT_TTL_SECONDS * 1000;
  }

  /** An upload session that can still be read: an ended one is gone (410), as tus asks. */
  private session(id: string): Transfer {
    const t = this.transfers.get(id);
    if (t.direction !== 'upload') {
      throw new ApiError('UPLOAD_NOT_FOUND', `transfer ${id} is a download, not a tus upload`, { id });
    }
    if (t.state === 'cancelled' || t.state === 'expired' || t.state === 'failed') {
      throw new ApiError('UPLOAD_GONE', `upload ${id} was ${t.state}; create a new one`, {
        state: t.state,
      });
    }
    return t;
  }
}
