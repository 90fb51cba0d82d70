/**
 * Exports: a VDI's content, in a wire format, as a byte representation with
 * a validator. The layout comes from the extents, so the size is exact before
 * the first byte and any range can be produced on its own.
 */
import { codecFor } from '../formats/index.js';
import type { SerializedImage } from '../formats/types.js';
import type { BlockImage } from '../image/block-image.js';
import type { Vdi, VdiStore } from '../storage/vdis.js';

/** Bumped whenever a serializer's output for the same content changes, so old ETags stop matching. */
const EXPORT_LAYOUT_VERSION = 1;

const FILE_EXTENSIONS: Record<string, string> = { raw: 'img', vhd: 'vhd', qcow2: 'qcow2' };

export interface ExportSource extends SerializedImage {
  vdi: Vdi;
  format: string;
  /** Strong validator: names the VDI, its content generation and the format. */
  etag: string;
  lastModified: Date;
  filename: string;
  close(): Promise<void>;
}

export function exportEtag(vdi: Vdi, format: string): string {
  return `"${vdi.id}.g${vdi.generation}.${format}.v${EXPORT_LAYOUT_VERSION}"`;
}

/** Opens the VDI's current generation; the export keeps reading it even if an import commits meanwhile. */
export async function openExport(vdis: VdiStore, vdiId: string, format: string): Promise<ExportSource> {
  const codec = codecFor(format);
  const vdi = vdis.get(vdiId);
  const image: BlockImage = await vdis.openImage(vdi);
  try {
    const serialized = await codec.serialize(image);
    return {
      vdi,
      format,
      size: serialized.size,
      read: (start, end) => serialized.read(start, end),
      etag: exportEtag(vdi, format),
      lastModified: new Date(vdi.content_updated_at),
      filename: `${safeName(vdi.name_label) || vdi.id}.${FILE_EXTENSIONS[format] ?? format}`,
      close: () => image.close(),
    };
  } catch (err) {
    await image.close();
    throw err;
  }
}

function safeName(label: string): string {
  return label
    .replace(/[^A-Za-z0-9._-]+/g, '_')
    .replace(/^[._]+/, '')
    .slice(0, 100);
}
