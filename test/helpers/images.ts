/** What an image file means, read by diskport's own codec: the oracle an import must match. */
import { codecFor } from '../../src/formats/index.js';

/** The disk `file` describes, as its codec reads the whole file, at `size` bytes (cut or zero-padded). */
export async function codecDisk(file: string, format: string, size: number): Promise<Buffer> {
  const image = await codecFor(format).open(file);
  try {
    const disk = Buffer.alloc(size);
    (await image.read(0, Math.min(size, image.virtualSize))).copy(disk);
    return disk;
  } finally {
    await image.close();
  }
}
