/** Whole reads and writes at a position: a pread or pwrite may move fewer bytes than asked. */
import { chmodSync, closeSync, promises as fsp, openSync } from 'node:fs';

/**
 * Fills `buf` from the file at `offset`; bytes past the end of the file read
 * as zeros (as qemu reads a qcow2 cluster cut short by the file's end, and as
 * a staged upload reads where its bytes have not been written).
 */
export async function readAt(handle: fsp.FileHandle, buf: Buffer, offset: number): Promise<Buffer> {
  let done = 0;
  while (done < buf.length) {
    const { bytesRead } = await handle.read(buf, done, buf.length - done, offset + done);
    if (bytesRead === 0) {
      buf.fill(0, done);
      break;
    }
    done += bytesRead;
  }
  return buf;
}

/** Writes buf[offset, offset + length) at `position`, however many writes it takes. */
export async function writeFully(
  handle: fsp.FileHandle,
  buf: Buffer,
  offset: number,
  length: number,
  position: number,
): Promise<void> {
  let done = 0;
  while (done < length) {
    const { bytesWritten } = await handle.write(buf, offset + done, length - done, position + done);
    done += bytesWritten;
  }
}

/** fsync by name: makes a file durable whoever wrote it, through whichever descriptor. */
export async function syncFile(path: string): Promise<void> {
  const handle = await fsp.open(path, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/**
 * Mode of every file diskport creates (images, staging, the metadata store):
 * disks hold their owners' data, and the store holds secrets (push receivers,
 * session state), so nobody but the service's user reads them.
 */
export const PRIVATE_FILE_MODE = 0o600;
/**
 * Creates `file` private if it is not there, and makes an older one private:
 * for files another library creates with the umask's mode (SQLite's).
 */
export function makePrivateFileSync(file: string): void {
  closeSync(openSync(file, 'a', PRIVATE_FILE_MODE));
  chmodSync(file, PRIVATE_FILE_MODE);
}

/** Mode of the directories diskport creates (data directory, SRs, staging). */
export const PRIVATE_DIR_MODE = 0o700;
