/**
 * The files of a chain at rest, per SR format (docs/design.md, "Layer files
 * per SR format"): how a layer is opened to read, and how one is written
 * over its parent at a commit. A content's format is its id's extension.
 */
import path from 'node:path';
import { codecFor } from '../formats/index.js';
import { Qcow2Image } from '../formats/qcow2/index.js';
import type { DiffRun } from '../image/block-diff.js';
import type { BlockImage } from '../image/block-image.js';
import type { DefinedRange } from '../image/chain-image.js';
import { RawFileImage } from '../image/raw-file-image.js';
import { writeRawLayer } from '../image/raw-layer.js';
import { writeQcow2Layer } from './qcow2-layers.js';
import { writeVhdLayer } from './vhd-layers.js';

/** SR formats whose VDIs keep layers after a snapshot; the others write a whole file per commit. */
export const LAYERED_FORMATS: ReadonlySet<string> = new Set(['raw', 'qcow2', 'vhd']);

export function formatOfContent(id: string): string {
  return path.extname(id).slice(1);
}

/**
 * Opens one file of a chain as the disk it holds itself: a raw file, or a
 * qcow2 or vhd (an overlay or differencing VHD too, whose parent the chain
 * reads, not this image).
 */
export function openLayerFile(file: string, format: string, virtualSize: number): Promise<BlockImage> {
  if (format === 'qcow2') return Qcow2Image.open(file, { differencing: true });
  if (format === 'vhd') return codecFor('vhd').open(file, { differencing: true });
  return RawFileImage.open(file, { virtualSize });
}

/**
 * Writes at `file` the layer of `format` that makes `next` read right over
 * its parent, whose file is `parentName` beside it, `runs` being where the
 * two differ (in order: diffBlocks'); fsynced. Returns the ranges it defines.
 */
export async function writeLayerFile(
  format: string,
  next: BlockImage,
  runs: AsyncIterable<DiffRun>,
  file: string,
  parentName: string,
  opts: { signal?: AbortSignal } = {},
): Promise<{ defined: DefinedRange[] }> {
  if (format === 'qcow2') return writeQcow2Layer(runs, next.virtualSize, file, parentName);
  if (format === 'vhd')
    return writeVhdLayer(next, runs, file, parentName, path.join(path.dirname(file), parentName), opts);
  return writeRawLayer(runs, next.virtualSize, file);
}
