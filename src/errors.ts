/**
 * Every failure the API reports is one of the codes below: an UPPER_SNAKE
 * code a client can branch on, the HTTP status it always answers with, and
 * what it means. The code throws them by name (`new ApiError('VDI_BUSY',
 * message)`) with a message that says what was wrong and what to do; they are
 * turned into JSON once, by the error middleware in src/http/errors.ts.
 * `npm run gen:errors` writes this table into openapi.yaml (ErrorCode).
 */

interface ErrorSpec {
  readonly status: number;
  readonly meaning: string;
}

export const ERRORS = {
  // 400: the request cannot be acted on as sent
  INVALID_REQUEST: { status: 400, meaning: 'a parameter, header, path or body field is not valid' },
  INVALID_JSON: { status: 400, meaning: 'the request body is not valid JSON' },
  INVALID_CURSOR: { status: 400, meaning: 'the list cursor is not one this service gave' },
  INVALID_URL: { status: 400, meaning: 'source_url or target_url is not a usable URL' },
  FETCH_TARGET_FORBIDDEN: {
    status: 400,
    meaning:
      'source_url or target_url resolves to a loopback, link-local or unspecified address not in --allow-fetch',
  },
  FETCH_TARGET_UNRESOLVABLE: {
    status: 400,
    meaning: 'the host of source_url or target_url does not resolve',
  },
  FORMAT_NOT_SUPPORTED: {
    status: 400,
    meaning: 'the wire or at-rest format is not one diskport or the SR supports',
  },
  MIGRATION_INVALID: {
    status: 400,
    meaning: 'a set migration cannot go ahead as asked; details.problems lists every problem, per disk',
  },
  MIGRATION_TOKEN_INVALID: { status: 400, meaning: 'dest is not a receive token a diskport gave' },
  SHRINK_NOT_ALLOWED: { status: 400, meaning: 'a VDI cannot be made smaller' },
  INVALID_CHECKSUM: { status: 400, meaning: "a transfer's checksum is not '<algorithm>:<hex>'" },
  CHECKSUM_MISMATCH: { status: 400, meaning: 'the whole upload does not match its declared checksum' },
  INVALID_CONTENT_RANGE: {
    status: 400,
    meaning: 'Content-Range is malformed or disagrees with Content-Length',
  },
  INVALID_CONTENT_DIGEST: { status: 400, meaning: 'Content-Digest is not a valid RFC 9530 header' },
  DIGEST_MISMATCH: { status: 400, meaning: 'a chunk does not match its Content-Digest; it was discarded' },
  CHUNK_TOO_LONG: { status: 400, meaning: 'the body is longer than its Content-Range' },
  CHUNK_INCOMPLETE: {
    status: 400,
    meaning: 'the body ended before its Content-Range; what arrived was kept',
  },
  CLIENT_DISCONNECTED: {
    status: 400,
    meaning: 'the client closed the connection before the whole body arrived',
  },
  MALFORMED_IMAGE: { status: 400, meaning: 'the bytes are not a well-formed image of the named format' },
  VDI_REQUIRED: { status: 400, meaning: 'a tus upload names no VDI in Upload-Metadata' },
  INVALID_UPLOAD_CHECKSUM: { status: 400, meaning: "a tus Upload-Checksum is not '<algorithm> <base64>'" },
  UNSUPPORTED_CHECKSUM_ALGORITHM: {
    status: 400,
    meaning: 'a checksum algorithm (?algorithm=, tus Upload-Checksum) other than sha256, sha1 or md5',
  },
  INVALID_TUS_REQUEST: { status: 400, meaning: 'a tus request lacks or misuses a tus header' },
  // 401, 403: authentication (management bearer token, xapi session_id, transfer token)
  TOKEN_REQUIRED: { status: 401, meaning: 'the call needs a token and none was sent' },
  TOKEN_INVALID: { status: 403, meaning: 'the token sent is not valid for this call' },
  IMAGEIO_TICKET_FORBIDDEN: {
    status: 403,
    meaning:
      'an /images/ request names an unknown, expired, cancelled or finished ticket, or an op it does not allow',
  },
  // 404
  NOT_FOUND: { status: 404, meaning: 'no such endpoint' },
  SR_NOT_FOUND: { status: 404, meaning: 'no storage repository with this id' },
  VDI_NOT_FOUND: { status: 404, meaning: 'no VDI with this id' },
  REMOTE_VDI_NOT_FOUND: { status: 404, meaning: 'the target server of a push has no VDI with this id' },
  TASK_NOT_FOUND: { status: 404, meaning: 'no task with this id' },
  TRANSFER_NOT_FOUND: { status: 404, meaning: 'no transfer with this id' },
  UPLOAD_NOT_FOUND: { status: 404, meaning: 'no tus upload with this id' },
  IMAGEIO_TICKET_NOT_FOUND: { status: 404, meaning: 'no ovirt-imageio ticket with this id' },
  MIGRATION_NOT_FOUND: { status: 404, meaning: 'no incoming migration with this id' },
  DISK_SET_NOT_FOUND: { status: 404, meaning: 'no disk set with this id' },
  DISK_SET_MEMBER_NOT_FOUND: { status: 404, meaning: 'the VDI is not a member of the disk set' },
  DISK_SET_SNAPSHOT_NOT_FOUND: { status: 404, meaning: 'no snapshot of this disk set with this id' },
  DIRTY_EXTENTS_UNAVAILABLE: {
    status: 404,
    meaning: 'extents?context=dirty on a ticket that is not part of an incremental backup (dirty: false)',
  },
  // 409: the request conflicts with the state of a resource
  VDI_BUSY: { status: 409, meaning: 'another transfer or operation holds the VDI' },
  VDI_LEASE_LOST: {
    status: 409,
    meaning:
      "this node's hold on the VDI lapsed (its heartbeat stopped past --node-timeout) and its write was not committed; run the operation again",
  },
  PUSH_IN_PROGRESS: { status: 409, meaning: 'a push of this VDI to this target is under way' },
  VDI_READ_ONLY: { status: 409, meaning: 'the VDI is a snapshot: its content cannot change' },
  VDI_IS_SNAPSHOT: {
    status: 409,
    meaning: 'a snapshot cannot itself be snapshotted; clone it for a writable copy',
  },
  TASK_FINISHED: { status: 409, meaning: 'the task has already finished; nothing to cancel' },
  TASK_CANCELLED: { status: 409, meaning: 'the task was cancelled' },
  TRANSFER_NOT_ACTIVE: {
    status: 409,
    meaning: 'the transfer has ended (committed, cancelled, failed or expired)',
  },
  TRANSFER_NOT_OPEN: {
    status: 409,
    meaning: 'the transfer is being finalized or has ended; it takes no more data',
  },
  TRANSFER_BUSY: { status: 409, meaning: 'chunk uploads are still running on the transfer' },
  TRANSFER_FINALIZING: {
    status: 409,
    meaning: 'the transfer is being committed and can no longer be cancelled',
  },
  TRANSFER_INCOMPLETE: { status: 409, meaning: 'finalize before every byte of the upload arrived' },
  WRONG_DIRECTION: { status: 409, meaning: 'a read of an upload transfer or a write to a download transfer' },
  CONFLICTING_LENGTH: {
    status: 409,
    meaning: 'a chunk or receiver states a total length other than the declared one',
  },
  SIZE_UNKNOWN: { status: 409, meaning: 'finalize before the upload length is known' },
  CHUNK_SUPERSEDED: {
    status: 409,
    meaning: 'finalize ended this chunk upload: its bytes had all arrived in others',
  },
  OFFSET_MISMATCH: { status: 409, meaning: "a tus PATCH's Upload-Offset is not the upload's offset" },
  IMAGEIO_TICKET_EXISTS: { status: 409, meaning: 'a ticket with this id is already installed' },
  MIGRATION_NOT_OPEN: {
    status: 409,
    meaning: 'the incoming migration was committed, aborted or expired; it takes no more changes',
  },
  FORMAT_MISMATCH: { status: 409, meaning: 'the receiving transfer of a push takes another format' },
  CHANGED_BLOCKS_UNKNOWN: {
    status: 409,
    meaning: 'diskport cannot tell which blocks changed between these two points (no record of them)',
  },
  BASE_MISMATCH: {
    status: 409,
    meaning: 'a delta import names a base snapshot whose content the VDI no longer holds',
  },
  // 410
  TRANSFER_EXPIRED: { status: 410, meaning: 'the transfer expired after its ttl without activity' },
  UPLOAD_GONE: { status: 410, meaning: 'the tus upload was cancelled, failed or expired' },
  // 412, 413, 415, 416, 422, 460
  TUS_VERSION_UNSUPPORTED: { status: 412, meaning: 'Tus-Resumable names a tus version other than 1.0.0' },
  TOO_LARGE: { status: 413, meaning: 'the upload or image is larger than declared or than the VDI' },
  CHUNK_PAST_END: { status: 413, meaning: "a chunk or zero range lands past the upload's end" },
  BODY_TOO_LARGE: { status: 413, meaning: 'a JSON body is larger than 1 MiB' },
  UNSUPPORTED_MEDIA_TYPE: {
    status: 415,
    meaning: 'the body has a Content-Type, charset or Content-Encoding diskport does not read',
  },
  RANGE_NOT_SATISFIABLE: { status: 416, meaning: 'the Range lies outside the representation' },
  UNSUPPORTED_IMAGE: { status: 422, meaning: 'a well-formed image uses a feature diskport cannot honour' },
  UPLOAD_CHECKSUM_MISMATCH: {
    status: 460,
    meaning: 'a tus PATCH body does not match its Upload-Checksum; it was discarded',
  },
  // 5xx: diskport or a peer failed
  INTERNAL_ERROR: { status: 500, meaning: 'diskport failed; the log has the cause under details.request_id' },
  INTERRUPTED: { status: 500, meaning: 'the service stopped while the task ran' },
  IMAGE_CORRUPT: {
    status: 500,
    meaning: "the VDI's stored image was damaged at rest and cannot be read; import its content again",
  },
  NOT_IMPLEMENTED: { status: 501, meaning: 'a tus extension diskport does not offer' },
  SOURCE_UNAVAILABLE: { status: 502, meaning: 'the source of a pull could not be fetched' },
  SOURCE_INCOMPLETE: { status: 502, meaning: 'the source of a pull kept failing before its end' },
  SOURCE_CHANGED: { status: 502, meaning: 'the source of a pull kept changing while it was fetched' },
  SOURCE_UNUSABLE: { status: 502, meaning: 'the source of a pull sent an encoded body, not the bytes' },
  REMOTE_UNAVAILABLE: { status: 502, meaning: 'the receiver of a push kept failing' },
  REMOTE_REJECTED: { status: 502, meaning: 'the receiver of a push refused it' },
  REMOTE_NOT_UPLOAD: { status: 502, meaning: 'the receiving transfer of a push is a download' },
  REMOTE_TRANSFER_ENDED: { status: 502, meaning: 'the receiving transfer of a push has ended' },
  REMOTE_IMPORT_FAILED: { status: 502, meaning: "the receiver's import of a push failed" },
  TOO_MANY_CONNECTIONS: {
    status: 503,
    meaning: 'diskport has --max-connections connections open; retry after Retry-After seconds',
  },
  METADATA_UNAVAILABLE: {
    status: 503,
    meaning:
      "diskport's PostgreSQL database (--database-url) cannot be reached; retry after Retry-After seconds",
  },
  NODE_UNREACHABLE: {
    status: 503,
    meaning:
      'the session is held by another diskport node that cannot be reached now; retry after Retry-After seconds (another node takes the session over once the holder is past --node-timeout)',
  },
  INSUFFICIENT_SPACE: { status: 507, meaning: 'the storage repository ran out of space' },
} as const satisfies Record<string, ErrorSpec>;

export type ErrorCode = keyof typeof ERRORS;

export function isErrorCode(code: unknown): code is ErrorCode {
  return typeof code === 'string' && Object.hasOwn(ERRORS, code);
}

/** A failure the API reports: one of ERRORS, with a message for the client. */
export class ApiError extends Error {
  readonly status: number;

  constructor(
    readonly code: ErrorCode,
    message: string,
    readonly details?: Record<string, unknown>,
    /** Response headers the error requires (e.g. Content-Range on 416). */
    readonly headers: Record<string, string> = {},
    options?: ErrorOptions,
  ) {
    super(message, options);
    this.name = new.target.name;
    this.status = ERRORS[code].status;
  }

  toJSON(): { code: string; message: string; details?: Record<string, unknown> } {
    return this.details
      ? { code: this.code, message: this.message, details: this.details }
      : { code: this.code, message: this.message };
  }
}

const NOT_FOUND_CODES = {
  sr: 'SR_NOT_FOUND',
  vdi: 'VDI_NOT_FOUND',
  task: 'TASK_NOT_FOUND',
  transfer: 'TRANSFER_NOT_FOUND',
  'disk set': 'DISK_SET_NOT_FOUND',
  'disk set snapshot': 'DISK_SET_SNAPSHOT_NOT_FOUND',
  migration: 'MIGRATION_NOT_FOUND',
} as const satisfies Record<string, ErrorCode>;

export class NotFoundError extends ApiError {
  constructor(kind: keyof typeof NOT_FOUND_CODES, id: string) {
    super(NOT_FOUND_CODES[kind], `no ${kind} with id '${id}'`, { id });
  }
}

/** The bytes are not a well-formed image of the named format. */
export class MalformedImageError extends ApiError {
  constructor(format: string, message: string, details?: Record<string, unknown>) {
    super('MALFORMED_IMAGE', `malformed ${format} image: ${message}`, { format, ...details });
  }
}

/** A well-formed image that uses a feature diskport cannot honour (backing file, encryption...). */
export class UnsupportedImageError extends ApiError {
  constructor(format: string, message: string, details?: Record<string, unknown>) {
    super('UNSUPPORTED_IMAGE', `unsupported ${format} image: ${message}`, { format, ...details });
  }
}

export class CancelledError extends ApiError {
  constructor(message = 'the task was cancelled') {
    super('TASK_CANCELLED', message);
  }
}

/** What a client reads for a failure that is diskport's own; the cause goes to the log only. */
export const INTERNAL_ERROR_MESSAGE = 'diskport failed to complete the request; its log has the cause';

/**
 * Names failures that are not ours (mostly, the client went away mid-upload);
 * anything else is an INTERNAL_ERROR whose text (paths, errno) stays in
 * `cause`, for the log, never in the message a client reads.
 */
export function toApiError(err: unknown): ApiError {
  if (err instanceof ApiError) return err;
  const code = (err as NodeJS.ErrnoException)?.code;
  if (
    code === 'ECONNRESET' ||
    code === 'ERR_STREAM_PREMATURE_CLOSE' ||
    (err as Error)?.message === 'aborted'
  ) {
    return new ApiError(
      'CLIENT_DISCONNECTED',
      'the client closed the connection before the whole image arrived; nothing was changed: send it again, or use a resumable transfer',
    );
  }
  // A full disk, wherever it surfaced (a write, or the flush that gathered it): the client's answer is 507.
  if (code === 'ENOSPC') {
    return new ApiError(
      'INSUFFICIENT_SPACE',
      'the storage repository ran out of space; free space there and retry',
      undefined,
      {},
      { cause: err },
    );
  }
  return new ApiError('INTERNAL_ERROR', INTERNAL_ERROR_MESSAGE, undefined, {}, { cause: err });
}

export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1 && v % 1024 === 0) {
    v /= 1024;
    i++;
  }
  return `${v} ${units[i]}`;
}
