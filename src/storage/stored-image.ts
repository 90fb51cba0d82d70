/**
 * A VDI's image at rest, as every read of it sees it (exports, checksums,
 * extents, pushes, resizes). diskport stores only images it validated, so a
 * codec's complaint while reading one (a compressed cluster that no longer
 * inflates, a table that now points outside the file) means the file was
 * damaged at rest: diskport's failure, not the client's, whose request was
 * fine. It becomes IMAGE_CORRUPT (500), with the codec's words kept as the
 * cause, for the log only.
 */
import { ApiError } from '../errors.js';
import type { BlockImage, ByteSpan, Extent } from '../image/block-image.js';

/** What a codec throws for bytes it cannot read as its format. */
const CODEC_REFUSALS = new Set(['MALFORMED_IMAGE', 'UNSUPPORTED_IMAGE', 'TOO_LARGE']);

export function corruptAtRest(vdiId: string, err: unknown): unknown {
  if (!(err instanceof ApiError) || !CODEC_REFUSALS.has(err.code)) return err;
  return new ApiError(
    'IMAGE_CORRUPT',
    `the stored image of VDI ${vdiId} is damaged and cannot be read; import its content again (the service log has the details)`,
    { vdi: vdiId },
    {},
    { cause: err },
  );
}

export class StoredImage implements BlockImage {
  readonly unallocated?: () => Promise<ByteSpan[]>;

  constructor(
    private readonly image: BlockImage,
    private readonly vdiId: string,
  ) {
    const unallocated = image.unallocated?.bind(image);
    if (unallocated) {
      this.unallocated = () => unallocated().catch((err) => Promise.reject(corruptAtRest(this.vdiId, err)));
    }
  }

  get virtualSize(): number {
    return this.image.virtualSize;
  }

  read(offset: number, length: number): Promise<Buffer> {
    return this.image.read(offset, length).catch((err) => Promise.reject(corruptAtRest(this.vdiId, err)));
  }

  readInto(buf: Buffer, offset: number): Promise<Buffer> {
    return this.image.readInto(buf, offset).catch((err) => Promise.reject(corruptAtRest(this.vdiId, err)));
  }

  extents(): Promise<Extent[]> {
    return this.image.extents().catch((err) => Promise.reject(corruptAtRest(this.vdiId, err)));
  }

  close(): Promise<void> {
    return this.image.close();
  }
}
