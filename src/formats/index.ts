/** The codec for each wire format, by name. */
import { ApiError } from '../errors.js';
import { qcow2Codec } from './qcow2/index.js';
import { rawCodec } from './raw/index.js';
import type { FormatCodec, WireFormat } from './types.js';
import { vhdCodec } from './vhd/index.js';

const CODECS = new Map<string, FormatCodec>([
  ['raw', rawCodec],
  ['vhd', vhdCodec],
  ['qcow2', qcow2Codec],
]);

export function availableFormats(): WireFormat[] {
  return [...CODECS.keys()] as WireFormat[];
}

export function codecFor(format: string): FormatCodec {
  const codec = CODECS.get(format);
  if (!codec) {
    throw new ApiError(
      'FORMAT_NOT_SUPPORTED',
      `unknown format '${format}'; use one of: ${availableFormats().join(', ')}`,
      { format, supported: availableFormats() },
    );
  }
  return codec;
}
