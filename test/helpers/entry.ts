/**
 * How tests start diskport's programs as processes: the built `dist/` file
 * when the build is at least as new as every source file (`npm test` builds
 * first; CI's `npm ci` too), else the source through tsx. A built start
 * costs a third of the CPU of a tsx one (0.6 s against 1.7 s here), and the
 * crash tests start hundreds of servers.
 */
import fs from 'node:fs';
import path from 'node:path';

const ROOT = path.resolve(import.meta.dirname, '../..');

let newestSource: number | null = null;
function newestSourceMtime(): number {
  if (newestSource !== null) return newestSource;
  let newest = 0;
  const walk = (dir: string) => {
    for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else newest = Math.max(newest, fs.statSync(p).mtimeMs);
    }
  };
  walk(path.join(ROOT, 'src'));
  newestSource = newest;
  return newest;
}

/**
 * The node arguments that run `entry` (a path under src/ without its
 * extension: 'main', 'cli/main'), built or from source.
 */
export function entryArgs(entry: string): string[] {
  const built = path.join(ROOT, 'dist', `${entry}.js`);
  try {
    if (process.env.DISKPORT_TEST_FROM_SOURCE !== '1' && fs.statSync(built).mtimeMs >= newestSourceMtime())
      return [built];
  } catch {
    // Not built: from source.
  }
  return ['--import', 'tsx', path.join(ROOT, 'src', `${entry}.ts`)];
}
