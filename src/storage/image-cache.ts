/**
 * Opened images of committed generations, shared by reads that come close
 * together: the ranged GETs, HEADs and extents requests a client such as
 * qemu's HTTP driver or an imageio-style backup agent sends by the thousand.
 *
 * Why: opening the file, walking its allocation (SEEK_DATA/SEEK_HOLE or the
 * format's tables) and laying out a vhd or qcow2 export cost far more than
 * the 64 KiB a ranged GET serves. Done once per generation, a ranged read
 * costs one row lookup and the pread of its bytes.
 *
 * Safe because a generation's file never changes once committed: an import,
 * a resize or a conversion commits a new generation, which is a new key. The
 * VDI's row is read on every lease, so a commit or a delete is seen by the
 * next request. An entry of an older generation is dropped as soon as a newer
 * one is leased; its file closes when its last reader releases it. Idle
 * entries close after IDLE_MS, so a deleted VDI's space comes back soon.
 */
import { LRUCache } from 'lru-cache';
import { codecFor } from '../formats/index.js';
import type { SerializedImage } from '../formats/types.js';
import type { BlockImage, Extent } from '../image/block-image.js';
import { type Vdi, type VdiStore, vhdUuidOf } from './vdis.js';

const MAX_OPEN_IMAGES = 64;
const IDLE_MS = 10_000;
/** A commit between reading the row and opening its file removes the file: read the row again. */
const OPEN_ATTEMPTS = 3;

interface Entry {
  key: string;
  vdiId: string;
  image: Promise<BlockImage>;
  extents?: Promise<Extent[]>;
  /** The extents once computed: what `readyExtents` serves without waiting. */
  extentsDone?: Extent[];
  layouts: Map<string, Promise<SerializedImage>>;
  /** The image once open, and the layouts once made: what `ready` serves without waiting. */
  opened?: BlockImage;
  laid: Map<string, SerializedImage>;
  leases: number;
  evicted: boolean;
}

/** One reader's hold on a shared image; `release()` once done with everything it gave. */
export interface ImageLease {
  readonly vdi: Vdi;
  readonly image: BlockImage;
  extents(): Promise<Extent[]>;
  /** The export layout of this generation in `format`, computed once. */
  serialize(format: string): Promise<SerializedImage>;
  release(): void;
}

/** What `ready` gives: the row, the open image and its layout; `release()` once read. */
export interface ReadyExport {
  readonly vdi: Vdi;
  readonly image: BlockImage;
  readonly serialized: SerializedImage;
  release(): void;
}

function closeEntry(entry: Entry): void {
  entry.image.then((image) => image.close()).catch(() => {});
}

export class ImageCache {
  private readonly entries = new LRUCache<string, Entry>({
    max: MAX_OPEN_IMAGES,
    ttl: IDLE_MS,
    ttlAutopurge: true,
    updateAgeOnGet: true,
    dispose: (entry) => {
      entry.evicted = true;
      if (this.current.get(entry.vdiId) === entry.key) this.current.delete(entry.vdiId);
      if (entry.leases === 0) closeEntry(entry);
    },
  });
  /** VDI id -> the key of its newest entry. */
  private readonly current = new Map<string, string>();

  constructor(private readonly vdis: VdiStore) {}

  async lease(vdiId: string): Promise<ImageLease> {
    for (let attempt = 1; ; attempt++) {
      const vdi = this.vdis.get(vdiId);
      const entry = this.entryFor(vdi);
      entry.leases++;
      try {
        return this.leaseOf(vdi, entry, await entry.image);
      } catch (err) {
        this.release(entry);
        if (this.entries.peek(entry.key) === entry) this.entries.delete(entry.key);
        if ((err as NodeJS.ErrnoException).code !== 'ENOENT' || attempt >= OPEN_ATTEMPTS) throw err;
      }
    }
  }

  /**
   * The VDI's current generation when its image is open and its layout in
   * `format` (a codec's name) made already, leased; else undefined (lease()
   * then opens them). Synchronous: a small ranged read waits for nothing
   * but its bytes. The row is read as by lease(), so a commit is seen.
   */
  ready(vdiId: string, format: string): ReadyExport | undefined {
    const vdi = this.vdis.get(vdiId);
    const key = entryKey(vdi);
    if (this.current.get(vdi.id) !== key) return undefined;
    const entry = this.entries.get(key);
    const image = entry?.opened;
    const serialized = entry?.laid.get(format);
    if (!entry || !image || !serialized || entry.evicted) return undefined;
    entry.leases++;
    let released = false;
    return {
      vdi,
      image,
      serialized,
      release: () => {
        if (released) return;
        released = true;
        this.release(entry);
      },
    };
  }

  /**
   * The extents of the VDI's current generation when computed already, else
   * undefined (a lease's extents() computes them). Synchronous, as `ready`.
   */
  readyExtents(vdiId: string): readonly Extent[] | undefined {
    const vdi = this.vdis.get(vdiId);
    const key = entryKey(vdi);
    if (this.current.get(vdi.id) !== key) return undefined;
    const entry = this.entries.get(key);
    return entry && !entry.evicted ? entry.extentsDone : undefined;
  }

  /** Lets go of a VDI's images (deleted, or a new generation committed): they close once released. */
  drop(vdiId: string): void {
    const key = this.current.get(vdiId);
    if (key !== undefined) this.entries.delete(key);
  }

  /** Closes every idle image (shutdown); images still read close when released. */
  clear(): void {
    this.entries.clear();
  }

  private entryFor(vdi: Vdi): Entry {
    const key = entryKey(vdi);
    const newest = this.current.get(vdi.id);
    if (newest !== undefined && newest !== key) this.entries.delete(newest);
    let entry = this.entries.get(key);
    if (!entry) {
      entry = {
        key,
        vdiId: vdi.id,
        image: this.vdis.openImage(vdi),
        layouts: new Map(),
        laid: new Map(),
        leases: 0,
        evicted: false,
      };
      const made = entry;
      // Awaited by the lease that made it; no unhandled rejection meanwhile.
      entry.image.then(
        (image) => {
          made.opened = image;
        },
        () => {},
      );
      this.entries.set(key, entry);
      this.current.set(vdi.id, key);
    }
    return entry;
  }

  private leaseOf(vdi: Vdi, entry: Entry, image: BlockImage): ImageLease {
    let released = false;
    return {
      vdi,
      image,
      extents: () => {
        if (!entry.extents) {
          const computing = image.extents();
          entry.extents = computing;
          computing.then(
            (done) => {
              if (entry.extents === computing) entry.extentsDone = done;
            },
            () => {},
          );
        }
        const extents = entry.extents;
        return forget(extents, () => {
          if (entry.extents === extents) entry.extents = undefined;
        });
      },
      serialize: (format) => {
        const codec = codecFor(format);
        let layout = entry.layouts.get(codec.name);
        if (!layout) {
          const uuid = vhdUuidOf(vdi);
          layout = codec.serialize(image, uuid ? { uuid } : {});
          entry.layouts.set(codec.name, layout);
          const kept = layout;
          kept.then(
            (serialized) => {
              if (entry.layouts.get(codec.name) === kept) entry.laid.set(codec.name, serialized);
            },
            () => {},
          );
        }
        const made = layout;
        return forget(made, () => {
          if (entry.layouts.get(codec.name) === made) entry.layouts.delete(codec.name);
        });
      },
      release: () => {
        if (released) return;
        released = true;
        this.release(entry);
      },
    };
  }

  private release(entry: Entry): void {
    entry.leases--;
    if (entry.leases === 0 && entry.evicted) closeEntry(entry);
  }
}

function entryKey(vdi: Vdi): string {
  return `${vdi.id}.g${vdi.generation}.${vdi.virtual_size}`;
}

/** A failed computation is not kept: the next reader tries again. */
function forget<T>(promise: Promise<T>, drop: () => void): Promise<T> {
  return promise.catch((err) => {
    drop();
    throw err;
  });
}
