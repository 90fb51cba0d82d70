/**
 * The download's side of sparseness: a stream written at increasing offsets,
 * with all-zero blocks left as holes (the file reads zeros there), and a
 * position (`written`) that a later run may resume from, so it moves only
 * once the writes before it have succeeded.
 */
import type { FileHandle } from 'node:fs/promises';
import { writeFully } from '../image/file-io.js';
import { HttpError } from '../transfer/retry-policy.js';
import { isZero, ZERO_BLOCK_BYTES } from './sparse-reader.js';

/** Bytes gathered before they are checked for zeros and written. */
const WRITE_BATCH_BYTES = 1024 * 1024;

/** Writes a stream at increasing offsets, skipping zero blocks (the file reads zeros there). */
export class SparseWriter {
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  skipped = 0;

  /** Everything before this offset was written (or is a hole): moves only once the writes succeeded. */
  private flushed: number;

  constructor(
    private readonly out: FileHandle,
    /** Offset of the next byte to arrive. */
    public pos: number,
  ) {
    this.flushed = pos;
  }

  /** Everything before this offset is in the file (or a hole there). */
  get written(): number {
    return this.flushed;
  }

  async push(chunk: Buffer): Promise<void> {
    this.pending.push(chunk);
    this.pendingBytes += chunk.length;
    this.pos += chunk.length;
    if (this.pendingBytes >= WRITE_BATCH_BYTES) await this.flush();
  }

  /**
   * Writes a response body that should end at `total`, calling `onChunk`
   * after each piece. What arrived is kept even when the body breaks off, so
   * a later run resumes after it; a body that ends early is a SHORT_BODY.
   */
  async receive(
    body: AsyncIterable<unknown>,
    total: number,
    onChunk: (bytes: number) => Promise<void>,
  ): Promise<void> {
    try {
      for await (const chunk of body) {
        await this.push(chunk as Buffer);
        await onChunk((chunk as Buffer).length);
      }
    } finally {
      await this.flush();
    }
    if (this.written < total) {
      throw new HttpError(502, 'SHORT_BODY', `the body ended at byte ${this.written} of ${total}`);
    }
  }

  async flush(): Promise<void> {
    if (!this.pendingBytes) return;
    const buf = this.pending.length === 1 ? this.pending[0] : Buffer.concat(this.pending);
    const base = this.pos - this.pendingBytes;
    this.pending = [];
    this.pendingBytes = 0;
    // Blocks on the absolute grid, so that a hole is recognised wherever the batch starts.
    let runStart = -1;
    let b = 0;
    while (b < buf.length) {
      const next = Math.min(
        buf.length,
        (Math.floor((base + b) / ZERO_BLOCK_BYTES) + 1) * ZERO_BLOCK_BYTES - base,
      );
      if (isZero(buf, b, next)) {
        if (runStart >= 0) await this.write(buf, runStart, b, base);
        runStart = -1;
        this.skipped += next - b;
      } else if (runStart < 0) {
        runStart = b;
      }
      b = next;
    }
    if (runStart >= 0) await this.write(buf, runStart, buf.length, base);
    this.flushed = base + buf.length;
  }

  private write(buf: Buffer, start: number, end: number, base: number): Promise<void> {
    return writeFully(this.out, buf, start, end - start, base + start);
  }
}
