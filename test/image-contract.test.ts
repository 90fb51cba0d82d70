/**
 * The disk images stored in files, through the one contract every image
 * keeps (test/contracts/block-image.ts): raw files, VHD and qcow2 files as
 * qemu-img writes them, and the resized views an import reads them through.
 * Raw files opened for writing also pass the write side. The images that
 * live in memory (memory, empty) run the same contract in the unit tier
 * (test/unit/memory-image.test.ts).
 */
import { execFileSync } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before } from 'node:test';
import { qcow2Codec } from '../src/formats/qcow2/index.js';
import { vhdCodec } from '../src/formats/vhd/index.js';
import { RawFileImage, WritableRawFileImage } from '../src/image/raw-file-image.js';
import { ResizedImage } from '../src/image/resized-image.js';
import { sparseSupported } from '../src/image/sparse.js';
import { blockImageReadContract, writableImageContract } from './contracts/block-image.js';
import { prng } from './helpers/random.js';

const KiB = 1024;
const MiB = 1024 * KiB;
/** A multiple of 512 (VHD and qcow2 sizes are), of no larger block. */
const DISK_BYTES = 6 * MiB + 1536;
/** Raw files and memory images take any size. */
const ODD_DISK_BYTES = 5 * MiB + 777;

/**
 * A disk of `size` bytes: pieces of data at odd offsets and of odd lengths
 * (some compressible, some not), holes between them, data in the last bytes.
 */
function makeDisk(size: number, seed: number): Buffer {
  const rand = prng(seed);
  const disk = Buffer.alloc(size);
  for (let p = 0; p < 14; p++) {
    const length = 1 + Math.floor(rand() * 300 * KiB);
    const start = Math.floor(rand() * (size - length));
    const mask = p % 2 ? 0xff : 0x03;
    for (let i = start; i < start + length; i++) disk[i] = 1 + (Math.floor(rand() * 255) & mask);
  }
  for (let i = size - 700; i < size; i++) disk[i] = 1 + (i % 200);
  return disk;
}

/** Writes `disk` as a sparse raw file: all-zero 4 KiB blocks stay holes. */
function writeSparse(path: string, disk: Buffer): void {
  const fd = openSync(path, 'w');
  try {
    for (let pos = 0; pos < disk.length; pos += 4 * KiB) {
      const block = disk.subarray(pos, pos + 4 * KiB);
      if (block.some((b) => b !== 0)) writeSync(fd, block, 0, block.length, pos);
    }
  } finally {
    closeSync(fd);
  }
  execFileSync('truncate', ['-s', String(disk.length), path]);
}

function qemuImg(...args: string[]): void {
  execFileSync('/usr/bin/qemu-img', args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

const dir = mkdtempSync(join(tmpdir(), 'diskport-contract-'));
const disk = makeDisk(DISK_BYTES, 1);
const oddDisk = makeDisk(ODD_DISK_BYTES, 2);
const file = (name: string) => join(dir, name);

before(() => {
  writeSparse(file('disk.raw'), disk);
  writeSparse(file('odd.raw'), oddDisk);
  const raw = file('disk.raw');
  qemuImg('convert', '-O', 'vpc', '-o', 'subformat=dynamic,force_size=on', raw, file('dynamic.vhd'));
  qemuImg('convert', '-O', 'vpc', '-o', 'subformat=fixed,force_size=on', raw, file('fixed.vhd'));
  qemuImg('convert', '-O', 'qcow2', raw, file('plain.qcow2'));
  qemuImg('convert', '-c', '-O', 'qcow2', '-o', 'cluster_size=4096', raw, file('compressed.qcow2'));
  qemuImg(
    'convert',
    '-O',
    'qcow2',
    '-o',
    'extended_l2=on,cluster_size=65536',
    raw,
    file('subclusters.qcow2'),
  );
  qemuImg('convert', '-O', 'qcow2', '-o', 'compat=0.10,cluster_size=512', raw, file('v2-512.qcow2'));
});

after(() => rmSync(dir, { recursive: true, force: true }));

// The read side, for every image.

blockImageReadContract('raw file', async () => ({
  image: await RawFileImage.open(file('odd.raw')),
  expected: oddDisk,
  blockBytes: 4 * KiB,
}));

blockImageReadContract('raw file opened for writing', async () => ({
  image: await WritableRawFileImage.openWritable(file('odd.raw')),
  expected: oddDisk,
  blockBytes: 4 * KiB,
}));

blockImageReadContract('dynamic VHD written by qemu-img', async () => ({
  image: await vhdCodec.open(file('dynamic.vhd')),
  expected: disk,
  blockBytes: 2 * MiB,
}));

blockImageReadContract('fixed VHD written by qemu-img', async () => ({
  image: await vhdCodec.open(file('fixed.vhd')),
  expected: disk,
  blockBytes: 4 * KiB,
}));

blockImageReadContract('qcow2 written by qemu-img (64 KiB clusters)', async () => ({
  image: await qcow2Codec.open(file('plain.qcow2')),
  expected: disk,
  blockBytes: 64 * KiB,
}));

blockImageReadContract('compressed qcow2 (4 KiB clusters)', async () => ({
  image: await qcow2Codec.open(file('compressed.qcow2')),
  expected: disk,
  blockBytes: 4 * KiB,
}));

blockImageReadContract('qcow2 with extended L2 entries (2 KiB subclusters)', async () => ({
  image: await qcow2Codec.open(file('subclusters.qcow2')),
  expected: disk,
  blockBytes: 2 * KiB,
}));

blockImageReadContract('qcow2 version 2 (512-byte clusters)', async () => ({
  image: await qcow2Codec.open(file('v2-512.qcow2')),
  expected: disk,
  blockBytes: 512,
}));

blockImageReadContract('resized image, larger than a raw file', async () => ({
  image: new ResizedImage(await RawFileImage.open(file('odd.raw')), ODD_DISK_BYTES + MiB + 3),
  expected: Buffer.concat([oddDisk, Buffer.alloc(MiB + 3)]),
  blockBytes: 4 * KiB,
}));

blockImageReadContract('resized image, smaller than a qcow2 file', async () => ({
  image: new ResizedImage(await qcow2Codec.open(file('plain.qcow2')), 4 * MiB + 100),
  expected: disk.subarray(0, 4 * MiB + 100),
  blockBytes: 64 * KiB,
}));

// The write side, for the images that write.

let created = 0;
writableImageContract('raw file', async (size) => {
  const path = file(`written-${created++}.raw`);
  return {
    image: await WritableRawFileImage.create(path, size),
    blockBytes: 4 * KiB,
    freesZeroedBlocks: sparseSupported,
    reopen: () => RawFileImage.open(path),
    dispose: async () => rmSync(path, { force: true }),
  };
});
