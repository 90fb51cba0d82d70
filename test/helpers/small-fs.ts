/**
 * Small file systems that a test creates and removes: a tmpfs to fill up, a
 * loop-mounted ext4 for its limits (16 TiB files, lost+found). Mounting needs
 * root; `canMount()` says whether this machine lets the test do it, so a test
 * skips with the reason rather than fails.
 */
import { execFile } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { tempDir } from './server.js';

const run = promisify(execFile);

export interface SmallFs {
  /** The mount point. */
  dir: string;
  /** Bytes free for an unprivileged writer now. */
  free(): Promise<number>;
  /** Fills the file system with a file of its own (outside diskport's directories) until `leave` bytes are free. */
  fill(leave: number, name?: string): Promise<string>;
  unmount(): Promise<void>;
}

let mountable: Promise<string | null> | null = null;

/** Null when tmpfs and loop mounts work here; else why not. */
export function cannotMount(): Promise<string | null> {
  mountable ??= (async () => {
    let fs: SmallFs | null = null;
    try {
      fs = await mountTmpfs(1);
      return null;
    } catch (err) {
      return `cannot mount a small file system here (root and mount(8) needed): ${(err as Error).message}`;
    } finally {
      await fs?.unmount();
    }
  })();
  return mountable;
}

function smallFs(dir: string, cleanup: () => Promise<void>): SmallFs {
  const free = async () => {
    const s = await fsp.statfs(dir);
    return s.bavail * s.bsize;
  };
  return {
    dir,
    free,
    async fill(leave, name = 'filler.bin') {
      const file = path.join(dir, name);
      const handle = await fsp.open(file, 'a');
      const block = Buffer.alloc(64 * 1024, 0xa5);
      try {
        for (;;) {
          const room = (await free()) - leave;
          if (room <= 0) break;
          const n = Math.min(block.length, room);
          try {
            await handle.write(block, 0, n);
          } catch (err) {
            if ((err as NodeJS.ErrnoException).code === 'ENOSPC') break;
            throw err;
          }
        }
      } finally {
        await handle.close();
      }
      return file;
    },
    unmount: cleanup,
  };
}

async function unmountAndRemove(dir: string, extra: string[] = []): Promise<void> {
  // A server a test killed may still be letting go of its files: retry briefly, then
  // detach it lazily (an in-process server's handles close with the test process).
  for (let i = 0; ; i++) {
    try {
      await run('umount', i < 20 ? [dir] : ['-l', dir]);
      break;
    } catch (err) {
      if (i >= 20) throw err;
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  for (const p of [dir, ...extra]) await fsp.rm(p, { recursive: true, force: true });
}

/** A tmpfs of `mib` MiB at a new temporary directory (or at `at`, which must exist). */
export async function mountTmpfs(mib: number, at?: string): Promise<SmallFs> {
  const dir = at ?? (await tempDir('diskport-tmpfs-'));
  try {
    await run('mount', ['-t', 'tmpfs', '-o', `size=${mib}m`, 'tmpfs', dir]);
  } catch (err) {
    if (!at) await fsp.rm(dir, { recursive: true, force: true });
    throw err;
  }
  return smallFs(dir, () => unmountAndRemove(dir));
}

/** An ext4 file system (4 KiB blocks, as on real disks) of `mib` MiB, from an image file, loop-mounted at `at` or a new directory. */
export async function mountExt4(mib: number, at?: string): Promise<SmallFs> {
  const holder = await tempDir('diskport-ext4-');
  const image = path.join(holder, 'fs.img');
  const dir = at ?? path.join(holder, 'mnt');
  await fsp.mkdir(dir, { recursive: true });
  try {
    await run('truncate', ['-s', `${mib}M`, image]);
    await run('mkfs.ext4', ['-q', '-F', '-b', '4096', image]);
    await run('mount', ['-o', 'loop', image, dir]);
  } catch (err) {
    await fsp.rm(holder, { recursive: true, force: true });
    throw err;
  }
  return smallFs(dir, () => unmountAndRemove(dir, [holder]));
}
