/**
 * Exports: a VDI's content, in a wire format, as a byte representation with
 * a validator. The layout comes from the extents, so the size is exact before
 * the first byte and any range can be produced on its own.
 */
import { ApiError, toApiError } from '../errors.js';
import { codecFor } from '../formats/index.js';
import type { SerializedImage } from '../formats/types.js';
import { EXPORT_BLOCK_SIZE_BYTES as VHD_BLOCK_BYTES } from '../formats/vhd/index.js';
import { MaskedImage } from '../image/masked-image.js';
import { sendSpansTakesBuffers } from '../image/native.js';
import { CHANGED_BLOCK_BYTES, changedBlocks } from '../ops/changed-blocks.js';
import { type Vdi, type VdiStore, vhdUuidOf } from '../storage/vdis.js';
import type { TaskManager } from '../tasks/task-manager.js';

/**
 * Bumped whenever a serializer's output for the same content changes, so old
 * ETags stop matching. 2: a snapshot's VHD carries its id as unique id.
 */
const EXPORT_LAYOUT_VERSION = 2;
/** A delta commit between reading the changed blocks and leasing the image: read both again. */
const DELTA_ATTEMPTS = 3;

export const FILE_EXTENSIONS: Record<string, string> = { raw: 'img', vhd: 'vhd', qcow2: 'qcow2' };

export interface ExportSource extends SerializedImage {
  vdi: Vdi;
  format: string;
  /** Strong validator: names the VDI, its content generation and the format. */
  etag: string;
  lastModified: Date;
  filename: string;
  close(): Promise<void>;
}

export function exportEtag(vdi: Vdi, format: string, base?: Vdi): string {
  const delta = base ? `.base-${base.id}` : '';
  return `"${vdi.id}.g${vdi.generation}.${format}${delta}.v${EXPORT_LAYOUT_VERSION}"`;
}

/**
 * Opens the VDI's current generation, shared with the other reads of it
 * (VdiStore.images); the export keeps reading that generation even if an
 * import commits meanwhile. `close()` lets go of it.
 */
export async function openExport(
  vdis: VdiStore,
  vdiId: string,
  format: string,
  baseId?: string,
): Promise<ExportSource> {
  if (baseId !== undefined) return openDeltaExport(vdis, vdiId, format, baseId);
  const codec = codecFor(format);
  const lease = await vdis.images.lease(vdiId);
  try {
    const serialized = await lease.serialize(codec.name);
    const { vdi } = lease;
    return {
      vdi,
      format,
      size: serialized.size,
      read: (start, end) => serialized.read(start, end),
      ...(zeroCopyable(codec.name, serialized) && { spans: serialized.spans }),
      etag: exportEtag(vdi, format),
      lastModified: new Date(vdi.content_updated_at),
      filename: `${safeName(vdi.name_label) || vdi.id}.${FILE_EXTENSIONS[format] ?? format}`,
      close: async () => lease.release(),
    };
  } catch (err) {
    lease.release();
    throw err;
  }
}

/**
 * A delta export: only the blocks changed since snapshot `baseId` (from the
 * block digests), as a differencing VHD whose parent is the base's VHD export
 * (its unique id, locators naming `{base}.vhd`), or a qcow2 overlay whose
 * backing file is `{base}.qcow2`. VHD blocks are 2 MiB: a block with any
 * change carries all of its bytes. Raw has no way to say "unchanged": its
 * delta is the dirty extents read with ranged GETs of the raw export.
 */
async function openDeltaExport(
  vdis: VdiStore,
  vdiId: string,
  format: string,
  baseId: string,
): Promise<ExportSource> {
  const codec = codecFor(format);
  if (codec.name === 'raw') {
    throw new ApiError(
      'INVALID_REQUEST',
      `a raw export has no way to leave blocks out: for the blocks changed since ${baseId}, ` +
        `GET /v1/vdis/${vdiId}/extents?context=dirty&since=${baseId} and read the dirty extents with ranged GETs ` +
        'of the raw export, or ask for format=vhd or qcow2',
      { format, base: baseId },
    );
  }
  for (let attempt = 1; ; attempt++) {
    const { vdi, base, runs } = await changedBlocks(vdis, vdiId, baseId);
    const lease = await vdis.images.lease(vdiId);
    try {
      if (lease.vdi.generation !== vdi.generation && attempt < DELTA_ATTEMPTS) {
        lease.release();
        continue;
      }
      const unit = codec.name === 'vhd' ? VHD_BLOCK_BYTES : CHANGED_BLOCK_BYTES;
      const ranges = runs.map(([first, end]) => {
        const start = Math.floor((first * CHANGED_BLOCK_BYTES) / unit) * unit;
        return { start, length: Math.ceil((end * CHANGED_BLOCK_BYTES) / unit) * unit - start };
      });
      const ext = FILE_EXTENSIONS[format] ?? format;
      const serialized = await codec.serialize(new MaskedImage(lease.image, ranges), {
        uuid: vhdUuidOf(vdi),
        parent: { fileName: `${base.id}.${ext}`, uuid: vhdUuidOf(base) },
      });
      return {
        vdi,
        format,
        size: serialized.size,
        read: (start, end) => serialized.read(start, end),
        ...(zeroCopyable(codec.name, serialized) && { spans: serialized.spans }),
        etag: exportEtag(vdi, format, base),
        lastModified: new Date(vdi.content_updated_at),
        filename: `${vdi.is_snapshot ? vdi.id : safeName(vdi.name_label) || vdi.id}.${ext}`,
        close: async () => lease.release(),
      };
    } catch (err) {
      lease.release();
      throw err;
    }
  }
}

/** Whether the export's spans can be sent (see http/zero-copy.ts): a vhd's or qcow2's carry made bytes. */
function zeroCopyable(format: string, serialized: SerializedImage): boolean {
  return serialized.spans !== undefined && (format === 'raw' || sendSpansTakesBuffers);
}

export function safeName(label: string): string {
  return label
    .replace(/[^A-Za-z0-9._-]+/g, '_')
    .replace(/^[._]+/, '')
    .slice(0, 100);
}

/**
 * Reads of part of a disk (ranged GETs) are not tasks: they are counted here,
 * per wire format, and /metrics reports the totals. Plain counters, so a
 * read costs no allocation and no database write.
 */
export class ReadCounters {
  readonly requests = new Map<string, number>();
  readonly bytes = new Map<string, number>();
  /** Of every export's bytes (whole and ranged), those sent with sendfile. */
  sendfileBytes = 0;

  countRequest(format: string): void {
    this.requests.set(format, (this.requests.get(format) ?? 0) + 1);
  }

  countBytes(format: string, n: number): void {
    this.bytes.set(format, (this.bytes.get(format) ?? 0) + n);
  }

  countSendfile(n: number): void {
    this.sendfileBytes += n;
  }
}

/**
 * Runs the sending of an export as a task of its own: progress is what
 * `send` reports, cancelling the task aborts `send`, and the outcome is
 * persisted. How the bytes go out (an HTTP response, say) is the caller's.
 */
export async function runExportTask(
  tasks: TaskManager,
  source: ExportSource,
  bytesTotal: number,
  send: (task: { id: string; signal: AbortSignal; onBytes: (n: number) => void }) => Promise<void>,
): Promise<void> {
  const { vdi, format } = source;
  const task = tasks.start('export', vdi.id, { bytesTotal, format });
  try {
    await send({ id: task.id, signal: task.signal, onBytes: (n) => task.addBytes(n) });
    task.succeed({ vdi: vdi.id, format, bytes_sent: task.record.bytes_done, etag: source.etag });
  } catch (err) {
    task.fail(toApiError(err));
    throw err;
  }
}
