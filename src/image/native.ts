/**
 * The project's N-API addon (native/seek_hole.c): what Node's fs cannot ask
 * of the kernel. Every user has a fallback for when it is not built.
 */
import { createRequire } from 'node:module';

export interface NativeAddon {
  seekData(fd: number, offset: number): number;
  seekHole(fd: number, offset: number): number;
  punchHole(fd: number, offset: number, length: number): boolean;
  dropCache(fd: number): boolean;
  alignedBuffer(size: number, alignment: number): Buffer;
}

function loadAddon(): NativeAddon | null {
  const require = createRequire(import.meta.url);
  for (const candidate of ['../../build/Release/seek_hole.node', '../../../build/Release/seek_hole.node']) {
    try {
      return require(candidate) as NativeAddon;
    } catch {
      // try the next layout (src/ under tsx, dist/ when built)
    }
  }
  return null;
}

export const addon = loadAddon();
