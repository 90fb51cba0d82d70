/**
 * The CLI download's SparseWriter on real files: the bytes come out exact,
 * zero blocks stay holes, and its `written` position (what a later run
 * resumes from) never counts bytes whose write failed.
 */
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { SparseWriter } from '../src/cli/sparse-writer.js';
import { seededBytes } from './helpers/random.js';
import { tempDir } from './helpers/server.js';

const MiB = 1024 * 1024;
let dir: string;

before(async () => {
  dir = await tempDir('diskport-sparse-writer-');
});
after(() => fsp.rm(dir, { recursive: true, force: true }));

/** 4 MiB: data, 1 MiB of zeros, data; delivered in uneven pieces. */
function stream(): { whole: Buffer; pieces: Buffer[] } {
  const whole = Buffer.concat([
    seededBytes(MiB + 1234, 1),
    Buffer.alloc(MiB),
    seededBytes(2 * MiB - 1234, 2),
  ]);
  const pieces: Buffer[] = [];
  for (let at = 0, n = 1; at < whole.length; at += n, n = (n * 7 + 4099) % (300 * 1024)) {
    pieces.push(whole.subarray(at, Math.min(whole.length, at + n)));
  }
  return { whole, pieces };
}

test('writes a stream exactly, resuming at an offset, and leaves zero blocks as holes', async () => {
  const { whole, pieces } = stream();
  const file = path.join(dir, 'out');
  const out = await fsp.open(file, 'w');
  try {
    // A first run got 100 000 bytes in; this one continues from there.
    await out.write(whole, 0, 100_000, 0);
    let at = 0;
    let w: SparseWriter | undefined;
    for (const p of pieces) {
      if (at + p.length > 100_000) {
        w ??= new SparseWriter(out, at);
        await w.push(p);
      }
      at += p.length;
    }
    assert.ok(w);
    await w.flush();
    assert.equal(w.written, whole.length);
    assert.ok(w.skipped >= MiB - 64 * 1024, `${w.skipped} bytes of zeros left as holes`);
    await out.truncate(whole.length);
  } finally {
    await out.close();
  }
  assert.ok((await fsp.readFile(file)).equals(whole));
});

test('a failed write does not move `written`: a resume restarts before the lost bytes', async () => {
  const { pieces } = stream();
  const file = path.join(dir, 'readonly');
  await fsp.writeFile(file, '');
  // Every write to a descriptor opened for reading fails (EBADF), as a full disk fails it.
  const out = await fsp.open(file, 'r');
  try {
    const w = new SparseWriter(out, 5 * MiB);
    await assert.rejects(async () => {
      for (const p of pieces) await w.push(p);
      await w.flush();
    });
    assert.equal(w.written, 5 * MiB, 'nothing counts as written');
  } finally {
    await out.close();
  }
});
