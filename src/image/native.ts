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
  /**
   * native/sendfile.c: sends spans ([fdIndex, position, length]...) to a socket on a thread of its own:
   * fdIndex >= 0 a file, -1 zeros, -2 - i bytes of buffers[i].
   */
  sendSpans(
    socketFd: number,
    fileFds: number[],
    spans: number[] | Float64Array,
    onProgress: (sent: number) => void,
    onDone: (code: string | null, sent: number) => void,
    buffers?: (ArrayBuffer | ArrayBufferView)[],
  ): SendJob;
  /** 2 where sendSpans takes buffer spans and a Float64Array (an addon built before them has none). */
  sendSpansVersion?: number;
  /** Stops a sendSpans job; its onDone still comes (ECANCELED, unless it had finished). */
  cancelSend(job: SendJob): void;
  /**
   * native/digests.c: on the thread pool, block i = the next counts[i] parts;
   * entries: 16 bytes per block (SHA-256's first 16, zeros for a zero block).
   */
  sha256Blocks(
    parts: Buffer[],
    counts: number[],
    callback: (err: Error | null, entries: Buffer) => void,
  ): void;
}

/** A running sendSpans, only for cancelSend. */
export type SendJob = { readonly __sendJob: unique symbol };

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

/**
 * Whether the addon's sendSpans takes buffer spans (a vhd or qcow2 export's own bytes between its
 * file spans). With an addon built before them, those exports stream and raw ones still use sendfile.
 */
export const sendSpansTakesBuffers = (addon?.sendSpansVersion ?? 0) >= 2;
