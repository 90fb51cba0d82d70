/** Space rules: the reserve a guard keeps, what a declared upload must find free, how sizes read. */
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, test } from 'node:test';
import { parseSize } from '../../src/config.js';
import { ApiError } from '../../src/errors.js';
import { freeBytes, humanBytes, isOutOfSpace, SpaceGuard, spaceError } from '../../src/image/space.js';
import { probeMaxFileSize } from '../../src/storage/file-limits.js';
import type { Vdi } from '../../src/storage/vdis.js';
import { spaceNeeded } from '../../src/transfer/upload-rules.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const vdi = (image_format: string) => ({ image_format, virtual_size: 1024 * MiB }) as Vdi;

describe('spaceNeeded', () => {
  const cases: { name: string; args: Parameters<typeof spaceNeeded>; need: number }[] = [
    {
      name: 'raw is the disk: never refused up front',
      args: [100 * MiB, 0, 'raw', vdi('raw'), null],
      need: 0,
    },
    { name: 'raw into qcow2 either', args: [100 * MiB, 0, 'raw', vdi('qcow2'), null], need: 0 },
    {
      name: 'qcow2 linked into a qcow2 VDI',
      args: [100 * MiB, 0, 'qcow2', vdi('qcow2'), null],
      need: 100 * MiB,
    },
    {
      name: 'qcow2 streamed into a raw VDI',
      args: [100 * MiB, 0, 'qcow2', vdi('raw'), null],
      need: 100 * MiB,
    },
    {
      name: 'qcow2 with a checksum into raw: staged whole, then copied',
      args: [100 * MiB, 0, 'qcow2', vdi('raw'), 'sha256:00'],
      need: 200 * MiB,
    },
    {
      name: 'vhd into qcow2: staged, then copied',
      args: [100 * MiB, 0, 'vhd', vdi('qcow2'), null],
      need: 200 * MiB,
    },
    {
      name: 'what is already staged counts',
      args: [100 * MiB, 40 * MiB, 'vhd', vdi('vhd'), null],
      need: 60 * MiB,
    },
    { name: 'never negative', args: [10, 40, 'vhd', vdi('vhd'), null], need: 0 },
  ];
  for (const c of cases) test(c.name, () => assert.equal(spaceNeeded(...c.args), c.need));
});

describe('parseSize and humanBytes', () => {
  for (const [text, bytes] of [
    ['0', 0],
    ['4096', 4096],
    ['512K', 512 * 1024],
    ['32M', 32 * MiB],
    ['32MiB', 32 * MiB],
    ['2g', 2 * 1024 * MiB],
  ] as const) {
    test(`'${text}' is ${bytes} bytes`, () => assert.equal(parseSize(text), bytes));
  }
  for (const bad of ['', '-1', '1.5G', '12T', 'lots']) {
    test(`'${bad}' is refused`, () => assert.throws(() => parseSize(bad)));
  }
  test('sizes read at a glance, to a tenth', () => {
    assert.equal(humanBytes(512), '512 B');
    assert.equal(humanBytes(32 * MiB), '32 MiB');
    assert.equal(humanBytes(1.25 * MiB), '1.3 MiB');
    assert.equal(humanBytes(16 * 1024 ** 4 - 4096), '16 TiB');
  });
});

describe('space errors', () => {
  test('ENOSPC, EDQUOT and SQLITE_FULL become a 507 without the errno text', () => {
    for (const code of ['ENOSPC', 'EDQUOT', 'SQLITE_FULL']) {
      const err = Object.assign(new Error(`${code}: no space left on device, write '/srv/x'`), { code });
      assert.ok(isOutOfSpace(err));
      const mapped = spaceError(err, 'the commit');
      assert.ok(mapped instanceof ApiError);
      assert.equal(mapped.status, 507);
      assert.equal(mapped.code, 'INSUFFICIENT_SPACE');
      assert.doesNotMatch(mapped.message, /ENOSPC|EDQUOT|SQLITE|\/srv/);
    }
  });
  test('anything else is left as it was', () => {
    const eio = Object.assign(new Error('EIO'), { code: 'EIO' });
    assert.equal(spaceError(eio), eio);
    assert.equal(isOutOfSpace(eio), false);
  });
});

describe('SpaceGuard', () => {
  test('claims what is free above the reserve, counting writes in flight, and refuses the rest', async (t) => {
    const dir = os.tmpdir();
    const free = await freeBytes(dir);
    if (free < 4 * GiB) return t.skip(`${dir} has less than 4 GiB free`);
    // A reserve that leaves 1 GiB; nothing is written, so others writing to the same disk move it by little.
    const reserve = free - GiB;
    const guard = new SpaceGuard(dir, reserve);
    await guard.claim(400 * MiB);
    await guard.claim(400 * MiB);
    // Both are still in flight: a third does not fit, whatever the file system says now.
    await assert.rejects(guard.claim(400 * MiB), (err: ApiError) => {
      assert.equal(err.code, 'INSUFFICIENT_SPACE');
      assert.equal(err.details?.needed_bytes, 400 * MiB);
      assert.equal(err.details?.reserve_bytes, reserve);
      return true;
    });
    guard.release(400 * MiB);
    guard.release(400 * MiB);
    await guard.claim(400 * MiB);
    await assert.rejects(guard.ensure(2 * GiB, 'the upload'), /the upload needs 2 GiB more/);
  });
});

describe('probeMaxFileSize', () => {
  test('a file system that holds the ceiling answers the ceiling, and leaves no probe behind', async () => {
    const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'diskport-probe-'));
    try {
      assert.equal(await probeMaxFileSize(dir, 64 * MiB), 64 * MiB);
      assert.deepEqual(await fsp.readdir(dir), []);
      assert.equal(await probeMaxFileSize(path.join(dir, 'missing'), 64 * MiB), null);
    } finally {
      await fsp.rm(dir, { recursive: true, force: true });
    }
  });
});
