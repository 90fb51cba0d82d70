/**
 * Merges and kill -9 (issue 12, point 4): a real server process is killed at
 * 20 seeded moments of merges (down merges after a snapshot delete, and
 * flattenings past a depth limit of 3), restarted, and every VDI and snapshot
 * is checked byte for byte, at once and again after the merges the restart
 * runs again; the SR then holds exactly the files its rows name.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { createVdi } from './helpers/api.js';
import { chainChecks, changedBlocks, killsDuringMerges, spawnedSr } from './helpers/chain-checks.js';
import { rounds } from './helpers/pg.js';
import { prng } from './helpers/server.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 32 * MiB;
const KILLS = rounds(20, 5);
const DEPTH = 3;

describe('merges and kill -9', () => {
  const rnd = prng(1212);
  const sr = spawnedSr(['--max-chain-depth', String(DEPTH)]);
  const checks = chainChecks(sr, DEPTH);

  // Twenty restarts of a spawned server: minutes on a loaded machine, more than the default per test.
  test(`${KILLS} kills at seeded moments of merges, each followed by a restart and a check of every VDI and snapshot`, {
    timeout: 600_000,
  }, async (t) => {
    const vdi = await createVdi(sr.url, SIZE, { image_format: 'raw' });
    const first = changedBlocks(Buffer.alloc(SIZE), 1, 384, 0.1);
    await checks.importRaw(vdi.id, first);
    const { span, interrupted } = await killsDuringMerges(sr, checks, {
      vdi: vdi.id,
      first,
      kills: KILLS,
      rnd,
    });
    t.diagnostic(`${interrupted} of ${KILLS} kills cut a running merge (a merge took ${span} ms here)`);
    assert.ok(interrupted > 0, 'some kills cut a merge');
  });
});
