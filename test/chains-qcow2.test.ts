/**
 * Chains at rest in a qcow2 SR (docs/design.md, "Layer files per SR
 * format"): after a snapshot, an import costs the clusters it changes, in a
 * real qcow2 overlay naming its parent's file as backing file, so qemu-img
 * reads each VDI's top file as its whole disk. qemu-img is the judge: `check`
 * and `compare` (against the expected disk) of every VDI's and snapshot's
 * file after every step of a seeded history of imports, snapshots, clones,
 * deletes and merges (down merges and flattenings past a depth limit).
 */
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { api, createVdi, execFileP, sha256Url } from './helpers/api.js';
import {
  assertQcow2Reads,
  chainChecks,
  changedBlocks,
  layerFiles,
  sha256,
  spawnedSr,
} from './helpers/chain-checks.js';
import { prng, seededBytes, tempDir } from './helpers/server.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 32 * MiB;
const BLOCK = 64 * KiB;
const DATA = 24 * MiB;
const DEPTH = 3;

type VdiJson = { id: string; generation: number; virtual_size: number; is_snapshot: boolean };

/** `disk` with `blocks` seeded 64 KiB blocks rewritten: most with new data, some with zeros, some as they were. */
const changed = (disk: Buffer, seed: number, blocks: number) => changedBlocks(disk, seed, blocks, 0.15);

describe('chains at rest (qcow2 SR)', () => {
  let work: string;
  const sr = spawnedSr(['--max-chain-depth', String(DEPTH)]);
  const {
    importRaw,
    snapshot,
    remove,
    mergeTasks,
    fileOf,
    srBytes,
    assertReads,
    layersMerged: mergesDone,
  } = chainChecks(sr);

  before(async () => {
    work = await tempDir();
  });
  after(async () => {
    await fsp.rm(work, { recursive: true, force: true });
  });

  const url = () => sr.url;
  /** qemu-img's view of a VDI's file: a clean image whose chain reads as `want`. Returns the chain's depth. */
  const assertQemu = async (id: string, want: Buffer, what: string): Promise<number> => {
    const file = fileOf(id);
    await assertQcow2Reads(file, want, path.join(work, 'expected.raw'), what);
    const { stdout } = await execFileP('qemu-img', [
      'info',
      '--backing-chain',
      '--output=json',
      '-f',
      'qcow2',
      file,
    ]);
    const chain = JSON.parse(stdout) as { format: string; 'backing-filename'?: string }[];
    for (const layer of chain) assert.equal(layer.format, 'qcow2', `${what}: every layer is qcow2`);
    return chain.length;
  };
  const assertQcow2Export = async (id: string, want: Buffer, what: string) => {
    const res = await fetch(`${url()}/v1/vdis/${id}/contents?format=qcow2`);
    assert.equal(res.status, 200);
    const file = path.join(work, 'export.qcow2');
    await fsp.writeFile(file, Buffer.from(await res.arrayBuffer()));
    const expected = path.join(work, 'expected.raw');
    await fsp.writeFile(expected, want);
    await execFileP('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'raw', file, expected]).catch((err) =>
      assert.fail(`${what}: its qcow2 export: ${(err as Error).message}`),
    );
  };

  test('after a snapshot, an import adds an overlay of the changed clusters that qemu-img reads as the whole disk', async () => {
    const vdi = await createVdi(url(), SIZE, { image_format: 'qcow2' });
    const base = Buffer.alloc(SIZE);
    seededBytes(DATA, 1).copy(base);
    await importRaw(vdi.id, base);
    assert.equal(await assertQemu(vdi.id, base, 'the flat VDI'), 1);
    const model = new Map<string, Buffer>([[vdi.id, base]]);
    let live: Buffer = base;
    for (let round = 0; round < 3; round++) {
      const snap = await snapshot(vdi.id);
      model.set(snap.id, live);
      const next = changed(live, 10 + round, 8);
      const before = await srBytes();
      await importRaw(vdi.id, next);
      const grown = (await srBytes()) - before;
      // 8 blocks of 64 KiB at most, plus the overlay's header, L1, L2 and refcount clusters
      // (past the depth limit, a flattening copies the data under the layer at the limit).
      if (round + 2 <= DEPTH) {
        assert.ok(grown <= 8 * BLOCK + 6 * BLOCK, `round ${round}: the import grew the SR by ${grown} bytes`);
      }
      live = next;
      model.set(vdi.id, live);
      await mergesDone();
      // One overlay per retained snapshot, up to the depth limit (the layer at the limit is flattened).
      const depth = await assertQemu(vdi.id, live, `round ${round}`);
      assert.equal(depth, Math.min(round + 2, DEPTH), `round ${round}: the chain's depth`);
    }
    for (const [id, want] of model) {
      const what = id === vdi.id ? 'the VDI' : `snapshot ${id}`;
      await assertReads(id, want, what);
      await assertQcow2Export(id, want, what);
      await assertQemu(id, want, what);
    }

    // Rewriting the same bytes adds nothing.
    const before = await srBytes();
    await importRaw(vdi.id, live);
    assert.ok((await srBytes()) - before <= 4 * BLOCK, 'an identical import adds no cluster of data');
    await assertReads(vdi.id, live, 'the VDI after an identical import');
    await assertQemu(vdi.id, live, 'the VDI after an identical import');

    // A resize after a snapshot: the overlay is larger than its backing file.
    await snapshot(vdi.id).then((s) => model.set(s.id, live));
    assert.equal(
      (await api(url(), 'PATCH', `/v1/vdis/${vdi.id}`, { virtual_size: SIZE + 8 * MiB })).status,
      200,
    );
    live = Buffer.concat([live, Buffer.alloc(8 * MiB)]);
    model.set(vdi.id, live);
    await assertReads(vdi.id, live, 'the resized VDI');
    await assertQemu(vdi.id, live, 'the resized VDI');

    // kill -9 and a restart: every VDI and snapshot reads as before.
    await sr.server.stop('SIGKILL');
    await sr.start();
    await mergesDone();
    for (const [id, want] of model) await assertReads(id, want, `${id} after a kill -9`);
    for (const id of model.keys()) await remove(id);
    await mergesDone();
    assert.deepEqual(await layerFiles(sr.srDir), [], 'every layer file went with the last VDI needing it');
  });

  // qemu-img judges every file after every step: longer than the default timeout on a loaded machine.
  test('a seeded history of imports, snapshots, clones, deletes and merges: qemu-img check and compare after every step', {
    timeout: 600_000,
  }, async () => {
    const rnd = prng(4242);
    const first = await createVdi(url(), SIZE, { image_format: 'qcow2' });
    const start = Buffer.alloc(SIZE);
    seededBytes(DATA, 7).copy(start);
    await importRaw(first.id, start);
    /** Every VDI and snapshot, and the disk it must read as. */
    const model = new Map<string, Buffer>([[first.id, start]]);
    const writable = [first.id];
    const snaps: string[] = [];
    const steps: string[] = [];
    for (let step = 0; step < 20; step++) {
      const r = rnd();
      const pick = <T>(xs: T[]) => xs[Math.floor(rnd() * xs.length)];
      if (r < 0.4 || snaps.length === 0) {
        const id = pick(writable);
        const next = changed(model.get(id) as Buffer, 1000 + step, 4 + Math.floor(rnd() * 40));
        if (rnd() < 0.5 || snaps.length === 0) {
          const s = await snapshot(id);
          snaps.push(s.id);
          model.set(s.id, model.get(id) as Buffer);
          steps.push('snapshot');
        }
        await importRaw(id, next);
        model.set(id, next);
        steps.push('import');
      } else if (r < 0.6) {
        const id = pick(snaps);
        await remove(id);
        snaps.splice(snaps.indexOf(id), 1);
        model.delete(id);
        steps.push('delete snapshot');
      } else if (r < 0.75 && writable.length < 4) {
        const from = pick(snaps);
        const clone = (await api<VdiJson>(url(), 'POST', `/v1/vdis/${from}/clone`)).body;
        writable.push(clone.id);
        model.set(clone.id, model.get(from) as Buffer);
        steps.push('clone');
      } else if (writable.length > 1) {
        const id = pick(writable.slice(1));
        await remove(id);
        writable.splice(writable.indexOf(id), 1);
        model.delete(id);
        steps.push('delete clone');
      } else {
        const id = pick(writable);
        await importRaw(id, model.get(id) as Buffer);
        steps.push('identical import');
      }
      await mergesDone();
      for (const [id, want] of model) {
        const what = `step ${step} (${steps.slice(-2).join(', ')}): ${id}`;
        const depth = await assertQemu(id, want, what);
        assert.ok(depth <= DEPTH, `${what}: a chain of ${depth} past the depth limit`);
        assert.equal(await sha256Url(`${url()}/v1/vdis/${id}/contents`), sha256(want), what);
      }
    }
    const merges = await mergeTasks();
    assert.ok(merges.filter((t) => t.status === 'success').length > 0, 'merges ran');
    const kinds = new Set(steps);
    for (const k of ['snapshot', 'import', 'delete snapshot', 'clone'])
      assert.ok(kinds.has(k), `the history has a ${k}`);
    for (const id of model.keys()) await remove(id);
  });
});
