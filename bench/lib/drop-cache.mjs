#!/usr/bin/env node
/**
 * Drops the cached pages of the given files and every file under the given
 * directories
 * (posix_fadvise DONTNEED through the project's addon; clean pages only, so
 * `sync` first). A benchmark's GETs then all read from the disk: diskport's
 * imports write with O_DIRECT and leave nothing cached, so without this its
 * GET would read the disk while a reference's reads memory.
 * Usage: node drop-cache.mjs PATH...
 */
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';

const addon = createRequire(import.meta.url)('../../build/Release/seek_hole.node');

function drop(p) {
  const st = fs.statSync(p, { throwIfNoEntry: false });
  if (st?.isDirectory()) {
    for (const name of fs.readdirSync(p)) drop(path.join(p, name));
  } else if (st?.isFile()) {
    const fd = fs.openSync(p, 'r');
    try {
      addon.dropCache(fd);
    } finally {
      fs.closeSync(fd);
    }
  }
}

for (const p of process.argv.slice(2)) drop(p);
