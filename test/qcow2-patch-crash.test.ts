/**
 * A qcow2 layer patched in place (merges and flattenings of qcow2 chains)
 * switches to its new state with one write of its first sector, after every
 * other write is durable. A crash before that write must leave the image it
 * was: valid (`qemu-img check`, no cluster referenced with a refcount of 0)
 * and reading the same bytes, but for clusters written in place. The crash is made exact here: the patch
 * commits, then the old first sector is written back, which is the file a
 * kill just before the switch leaves.
 */
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { Qcow2Patch } from '../src/formats/qcow2/patch.js';
import { execFileP } from './helpers/api.js';
import { prng, tempDir } from './helpers/server.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 64 * MiB;
const CLUSTER = 64 * KiB;

async function check(file: string): Promise<void> {
  const res = await execFileP('qemu-img', ['check', '-f', 'qcow2', '--output=json', file]).catch(
    (err: { stdout?: string; code?: number }) => ({ stdout: err.stdout ?? '', code: err.code }),
  );
  const report = JSON.parse(res.stdout) as { corruptions?: number; 'check-errors'?: number };
  assert.equal(report.corruptions ?? 0, 0, `${path.basename(file)}: ${res.stdout}`);
  assert.equal(report['check-errors'] ?? 0, 0, `${path.basename(file)}: ${res.stdout}`);
}

async function rawOf(file: string, out: string): Promise<Buffer> {
  await execFileP('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', file, out]);
  return fsp.readFile(out);
}

describe('a qcow2 patch cut before its header switch', () => {
  let dir: string;
  before(async () => {
    dir = await tempDir();
  });
  after(async () => {
    await fsp.rm(dir, { recursive: true, force: true });
  });

  test('rewritten clusters, new clusters, zeroed clusters and a grown disk: the old image stays valid and reads as before', async () => {
    const rnd = prng(7);
    const cluster = (seed: number) => {
      const b = Buffer.alloc(CLUSTER);
      for (let i = 0; i < b.length; i += 4) b.writeUInt32LE((seed * 2654435761 + i) >>> 0, i);
      return b;
    };
    const file = path.join(dir, 'layer.qcow2');
    const first = await Qcow2Patch.create(file, SIZE, null);
    for (let k = 0; k < 200; k++)
      await first.write(Math.floor(rnd() * (SIZE / CLUSTER)) * CLUSTER, cluster(k));
    await first.commit();
    await first.close();
    await check(file);
    const before = await rawOf(file, path.join(dir, 'before.raw'));

    const sector = Buffer.alloc(512);
    const fd = await fsp.open(file, 'r+');
    try {
      await fd.read(sector, 0, 512, 0);
    } finally {
      await fd.close();
    }
    const patch = await Qcow2Patch.open(file);
    // Over mapped clusters (their L2 tables change), where nothing was, and zeros.
    const written = new Map<number, Buffer>();
    for (let k = 0; k < 300; k++) {
      const at = Math.floor(rnd() * (SIZE / CLUSTER));
      written.set(at, cluster(1000 + k));
      await patch.write(at * CLUSTER, cluster(1000 + k));
    }
    await patch.zero(0, 8 * CLUSTER);
    patch.grow(SIZE + 4 * MiB);
    await patch.commit();
    await patch.close();
    await check(file);
    const afterCommit = await rawOf(file, path.join(dir, 'after.raw'));
    assert.notDeepEqual(afterCommit.subarray(0, SIZE), before, 'the patch changed the disk');

    const cut = await fsp.open(file, 'r+');
    try {
      await cut.write(sector, 0, 512, 0);
      await cut.sync();
    } finally {
      await cut.close();
    }
    await check(file);
    const readBack = await rawOf(file, path.join(dir, 'cut.raw'));
    // A cluster the old tables map is written where it is (a merge writes
    // there what its readers read through the layer above anyway); every
    // other reads as before the patch.
    assert.equal(readBack.length, before.length, 'the old size');
    for (let c = 0; c < SIZE / CLUSTER; c++) {
      const got = readBack.subarray(c * CLUSTER, (c + 1) * CLUSTER);
      const was = before.subarray(c * CLUSTER, (c + 1) * CLUSTER);
      assert.ok(
        got.equals(was) || got.equals(written.get(c) ?? was),
        `cluster ${c} reads as before the patch`,
      );
    }
  });
});
