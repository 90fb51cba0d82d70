/**
 * Every failure the API reports is one of these: an HTTP status, an
 * UPPER_SNAKE code a client can branch on, and a message that says what was
 * wrong and what to do. They are thrown deep (codecs, storage, transfers) and
 * turned into JSON once, by the error middleware in src/http/errors.ts.
 */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly details?: Record<string, unknown>,
    /** Response headers the error requires (e.g. Content-Range on 416). */
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
    this.name = new.target.name;
  }

  toJSON(): { code: string; message: string; details?: Record<string, unknown> } {
    return this.details
      ? { code: this.code, message: this.message, details: this.details }
      : { code: this.code, message: this.message };
  }
}

export class BadRequestError extends ApiError {
  constructor(message: string, details?: Record<string, unknown>, code = 'INVALID_REQUEST') {
    super(400, code, message, details);
  }
}

export class NotFoundError extends ApiError {
  constructor(kind: string, id: string) {
    super(404, `${kind.toUpperCase()}_NOT_FOUND`, `no ${kind.toLowerCase()} with id '${id}'`, { id });
  }
}

export class ConflictError extends ApiError {
  constructor(code: string, message: string, details?: Record<string, unknown>) {
    super(409, code, message, details);
  }
}

export class TooLargeError extends ApiError {
  constructor(message: string, details?: Record<string, unknown>, code = 'TOO_LARGE') {
    super(413, code, message, details);
  }
}

/** The bytes are not a well-formed image of the named format. */
export class MalformedImageError extends ApiError {
  constructor(format: string, message: string, details?: Record<string, unknown>) {
    super(400, 'MALFORMED_IMAGE', `malformed ${format} image: ${message}`, { format, ...details });
  }
}

/** A well-formed image that uses a feature diskport cannot honour (backing file, encryption...). */
export class UnsupportedImageError extends ApiError {
  constructor(format: string, message: string, details?: Record<string, unknown>) {
    super(422, 'UNSUPPORTED_IMAGE', `unsupported ${format} image: ${message}`, { format, ...details });
  }
}

export class CancelledError extends ApiError {
  constructor(message = 'the task was cancelled') {
    super(409, 'TASK_CANCELLED', message);
  }
}

export class InterruptedError extends ApiError {
  constructor(message: string) {
    super(500, 'INTERRUPTED', message);
  }
}

export class InsufficientSpaceError extends ApiError {
  constructor(message: string) {
    super(507, 'INSUFFICIENT_SPACE', message);
  }
}

/** Names failures that are not ours: mostly, the client went away mid-upload. */
export function toApiError(err: unknown): ApiError {
  if (err instanceof ApiError) return err;
  const code = (err as NodeJS.ErrnoException)?.code;
  if (
    code === 'ECONNRESET' ||
    code === 'ERR_STREAM_PREMATURE_CLOSE' ||
    (err as Error)?.message === 'aborted'
  ) {
    return new ApiError(
      400,
      'CLIENT_DISCONNECTED',
      'the client closed the connection before the whole image arrived; nothing was changed: send it again, or use a resumable transfer',
    );
  }
  return new ApiError(500, 'INTERNAL_ERROR', (err as Error)?.message ?? String(err));
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
