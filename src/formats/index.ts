/** The codec for each wire format, by name. */
import { BadRequestError } from '../errors.js';
import { rawCodec } from './raw/index.js';
import type { FormatCodec, WireFormat } from './types.js';

const CODECS = new Map<string, FormatCodec>([['raw', rawCodec]]);

export function availableFormats(): WireFormat[] {
  return [...CODECS.keys()] as WireFormat[];
}

export function codecFor(format: string): FormatCodec {
  const codec = CODECS.get(format);
  if (!codec) {
    throw new BadRequestError(
      `unknown format '${format}'; use one of: ${availableFormats().join(', ')}`,
      { format, supported: availableFormats() },
      'FORMAT_NOT_SUPPORTED',
    );
  }
  return codec;
}
