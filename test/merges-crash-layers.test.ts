/**
 * Commits and merges of qcow2 and vhd chains and kill -9 (issue 12, points 3 and
 * 4): as test/merges-crash.test.ts for raw, a real server process is killed
 * at seeded moments, some while an import writes its overlay, the others
 * while the merges after it run (down merges after a snapshot delete,
 * flattenings past a depth limit of 3); after each restart every VDI and
 * snapshot reads byte for byte as before (a VDI whose import was cut reads
 * as before it or as after it, never otherwise), and once the merges ran
 * again, qemu-img check and compare pass on every VDI's file and the SR
 * holds exactly the files its rows name.
 */
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { createVdi, execFileP, sha256Url } from './helpers/api.js';
import {
  assertQcow2Reads,
  chainChecks,
  changedBlocks,
  killsDuringMerges,
  sha256,
  spawnedSr,
} from './helpers/chain-checks.js';
import { rounds } from './helpers/pg.js';
import { prng } from './helpers/server.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 32 * MiB;
const KILLS = rounds(10, 5);
const DEPTH = 3;

for (const format of ['qcow2', 'vhd'] as const)
  describe(`${format} commits and merges and kill -9`, () => {
    const rnd = prng(1212);
    const sr = spawnedSr(['--max-chain-depth', String(DEPTH)]);
    const checks = chainChecks(sr, DEPTH);
    const { importRaw, fileOf, assertModel } = checks;

    const assertQemu = async (model: Map<string, Buffer>, what: string) => {
      // qemu reads only a differencing VHD's own blocks: for vhd, qemu-img info is the judge.
      if (format === 'vhd') {
        for (const id of model.keys()) {
          await execFileP('qemu-img', ['info', '-f', 'vpc', fileOf(id)]).catch((err) =>
            assert.fail(`${what}: qemu-img info of ${id}: ${err}`),
          );
        }
        return;
      }
      const expected = path.join(sr.dataDir, 'expected.raw');
      for (const [id, want] of model) await assertQcow2Reads(fileOf(id), want, expected, `${what}: ${id}`);
      await fsp.rm(expected, { force: true });
    };

    test(`${KILLS} kills at seeded moments of ${format} commits and merges, each followed by a restart and a check of every VDI and snapshot`, {
      timeout: 600_000,
    }, async (t) => {
      const vdi = await createVdi(sr.url, SIZE, { image_format: format });
      const first = changedBlocks(Buffer.alloc(SIZE), 1, 384, 0.1);
      await importRaw(vdi.id, first);
      let cutImports = 0;
      const { span, interrupted } = await killsDuringMerges(sr, checks, {
        vdi: vdi.id,
        first,
        kills: KILLS,
        rnd,
        check: assertQemu,
        async instead({ round, previous, live, model, settle }) {
          if (round < 0 || round % 3 !== 0) return undefined;
          // A kill while the import writes its overlay: the VDI reads as before it or as after it.
          const importing = importRaw(vdi.id, live).then(
            () => true,
            () => false,
          );
          await sleep(Math.floor(rnd() * 400));
          await sr.server.stop('SIGKILL');
          await importing;
          await sr.start();
          const now = await sha256Url(`${sr.url}/v1/vdis/${vdi.id}/contents`);
          assert.ok(
            now === sha256(live) || now === sha256(previous),
            `round ${round}: the VDI after a cut import`,
          );
          const kept = now === sha256(live) ? live : previous;
          if (kept !== live) cutImports++;
          model.set(vdi.id, kept);
          await assertModel(model, `round ${round}, after a kill during an import`);
          await settle();
          return kept;
        },
      });
      t.diagnostic(`${interrupted} of ${KILLS} kills cut a running merge (a merge took ${span} ms here)`);
      t.diagnostic(`${cutImports} kills cut an import before it committed`);
      assert.ok(interrupted > 0, 'some kills cut a merge');
    });
  });
