/**
 * What a format leaves unallocated (ovirt-imageio's `hole`), judged by
 * qemu-img map: a qcow2 zero cluster or zero subcluster is allocated and
 * reads as zeros; a cluster nobody wrote is unallocated; a dynamic VHD's
 * unwritten blocks are unallocated; raw files have no such notion.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { codecFor } from '../../src/formats/index.js';
import type { BlockImage, ByteSpan } from '../../src/image/block-image.js';
import { RawFileImage } from '../../src/image/raw-file-image.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** qemu's own answer: the ranges `qemu-img map` reports as neither data nor present (depth-wise unallocated). */
function qemuUnallocated(file: string, format: string): ByteSpan[] {
  const map = JSON.parse(
    execFileSync('qemu-img', ['map', '--output=json', '-f', format, file]).toString(),
  ) as { start: number; length: number; data: boolean; present?: boolean }[];
  const out: ByteSpan[] = [];
  for (const e of map) {
    if (e.data || e.present !== false) continue;
    const last = out.at(-1);
    if (last && last.start + last.length === e.start) last.length += e.length;
    else out.push({ start: e.start, length: e.length });
  }
  return out;
}

describe('unallocated ranges of a format at rest', () => {
  let dir: string;
  before(async () => {
    dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'unallocated-'));
  });
  after(async () => {
    await fsp.rm(dir, { recursive: true, force: true });
  });

  for (const extendedL2 of [false, true]) {
    test(`qcow2${extendedL2 ? ' with subclusters' : ''}: zero clusters are allocated, unwritten ones are not, as qemu-img map says`, async () => {
      const file = path.join(dir, `z-${extendedL2}.qcow2`);
      const opts = extendedL2 ? ['-o', 'extended_l2=on,cluster_size=128k'] : [];
      execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', ...opts, file, '4M']);
      execFileSync('qemu-io', [
        '-f',
        'qcow2',
        '-c',
        'write -P 1 0 64k',
        '-c',
        'write -z 1M 64k',
        '-c',
        'write -z 2M 8k',
        '-c',
        'write -P 2 3M 4k',
        file,
      ]);
      const image = await codecFor('qcow2').open(file);
      try {
        const holes = await image.unallocated!();
        assert.deepEqual(holes, qemuUnallocated(file, 'qcow2'));
        assert.ok(holes.some((h) => h.start === 64 * KiB || h.start === 128 * KiB));
        assert.ok(
          !holes.some((h) => h.start <= MiB && h.start + h.length > MiB),
          'the zero cluster is allocated',
        );
      } finally {
        await image.close();
      }
    });
  }

  test('dynamic VHD: unwritten blocks are unallocated; a fixed VHD and a raw file have no such notion', async () => {
    const raw = path.join(dir, 'src.raw');
    execFileSync('qemu-img', ['create', '-q', '-f', 'raw', raw, '8M']);
    execFileSync('qemu-io', ['-f', 'raw', '-c', 'write -P 3 2M 2M', raw]);
    const dynamic = path.join(dir, 'd.vhd');
    execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'vpc', '-o', 'force_size=on', raw, dynamic]);
    const image = await codecFor('vhd').open(dynamic);
    try {
      assert.deepEqual(await image.unallocated!(), [
        { start: 0, length: 2 * MiB },
        { start: 4 * MiB, length: 4 * MiB },
      ]);
    } finally {
      await image.close();
    }
    const fixed = path.join(dir, 'f.vhd');
    execFileSync('qemu-img', [
      'convert',
      '-f',
      'raw',
      '-O',
      'vpc',
      '-o',
      'subformat=fixed,force_size=on',
      raw,
      fixed,
    ]);
    const f = await codecFor('vhd').open(fixed);
    try {
      assert.equal(f.unallocated, undefined);
    } finally {
      await f.close();
    }
    const r = await RawFileImage.open(raw);
    try {
      assert.equal((r as BlockImage).unallocated, undefined);
    } finally {
      await r.close();
    }
  });
});
