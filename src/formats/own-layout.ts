/**
 * Is a file already what diskport's own serializer writes? An image of the
 * same format as a VDI's at rest is kept as uploaded only then; any other is
 * rewritten by the serializer, so that every file at rest is one diskport
 * wrote (and `qemu-img check` passes on it): whatever an upload carried
 * beside the disk (snapshots, stale refcounts, feature bits, compressed or
 * oddly placed clusters) is gone, and every compressed cluster has been
 * inflated on the way.
 *
 * The serializer's layout is a pure function of the image's size and
 * extents, and its data clusters are the disk's bytes; so a file is its
 * own serializer's output when its length is the layout's and its bytes
 * outside the data are the layout's. Only those are read: metadata, whose
 * size follows the allocated data, never the virtual size.
 */
import { promises as fsp } from 'node:fs';
import { readAt } from '../image/file-io.js';

/** Bytes compared per read when the expected bytes come as one large buffer. */
const COMPARE_READ_BYTES = 1024 * 1024;

/** A file opened to be compared with the bytes a serializer would write. */
export class FileComparison {
  private constructor(
    private readonly handle: fsp.FileHandle,
    readonly size: number,
  ) {}

  static async open(path: string): Promise<FileComparison> {
    const handle = await fsp.open(path, 'r');
    try {
      return new FileComparison(handle, (await handle.stat()).size);
    } catch (err) {
      await handle.close();
      throw err;
    }
  }

  /** Whether the file holds `expected` at `position`. */
  async holds(position: number, expected: Buffer): Promise<boolean> {
    for (let done = 0; done < expected.length; done += COMPARE_READ_BYTES) {
      const part = expected.subarray(done, done + COMPARE_READ_BYTES);
      const got = await readAt(this.handle, Buffer.allocUnsafe(part.length), position + done);
      if (!got.equals(part)) return false;
    }
    return true;
  }

  /** Whether the file holds the concatenated `chunks` from `position` on. */
  async holdsStream(position: number, chunks: AsyncIterable<Buffer>): Promise<boolean> {
    let pos = position;
    for await (const chunk of chunks) {
      if (!(await this.holds(pos, chunk))) return false;
      pos += chunk.length;
    }
    return true;
  }

  close(): Promise<void> {
    return this.handle.close();
  }
}
