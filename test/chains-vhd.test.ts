/**
 * Chains at rest in a vhd SR (docs/design.md, "Layer files per SR format"):
 * after a snapshot, an import writes a real differencing VHD (disk type 4)
 * of the 2 MiB blocks it changes, naming its parent's file by the parent's
 * unique id and parent locators, as XCP-ng's chains are. qemu opens a
 * differencing VHD but reads only its own blocks, so the judges here are
 * `qemu-img info` and `check` on every file, the header fields read back,
 * and diskport's own chain reader: every VDI and snapshot reads its bytes.
 */
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import { api, createVdi, execFileP, sha256Url } from './helpers/api.js';
import { chainChecks, changedBlocks, layerFiles, sha256, spawnedSr } from './helpers/chain-checks.js';
import { seededBytes } from './helpers/server.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 32 * MiB;
const VHD_BLOCK = 2 * MiB;
const DEPTH = 3;

type VdiJson = { id: string };

/** `disk` with `blocks` seeded 64 KiB blocks rewritten, some with zeros. */
const changed = (disk: Buffer, seed: number, blocks: number) => changedBlocks(disk, seed, blocks, 0.2, 1);

/** 2 MiB blocks where `a` and `b` differ. */
function changedVhdBlocks(a: Buffer, b: Buffer): number {
  let n = 0;
  for (let at = 0; at < a.length; at += VHD_BLOCK) {
    if (!a.subarray(at, at + VHD_BLOCK).equals(b.subarray(at, at + VHD_BLOCK))) n++;
  }
  return n;
}

describe('chains at rest (vhd SR)', () => {
  const sr = spawnedSr(['--max-chain-depth', String(DEPTH)]);
  const { importRaw, remove, mergeTasks, query, srBytes, layersMerged: mergesDone } = chainChecks(sr);
  const url = () => sr.url;
  const rowOf = (id: string) =>
    query<{ file_name: string; content_id: string }>(
      'SELECT file_name, content_id FROM vdis WHERE id = ?',
      id,
    )[0];
  const parentOf = (contentId: string) =>
    query<{ parent: string | null }>('SELECT parent FROM contents WHERE id = ?', contentId)[0]?.parent ??
    null;
  /** qemu-img's view of a VDI's file, and its header: a differencing VHD naming its parent's file. */
  const assertVhdFile = async (id: string, what: string): Promise<number> => {
    const row = rowOf(id);
    const file = path.join(sr.srDir, row.file_name);
    const { stdout } = await execFileP('qemu-img', ['info', '--output=json', '-f', 'vpc', file]);
    const info = JSON.parse(stdout) as { format: string; 'virtual-size': number };
    assert.equal(info.format, 'vpc', `${what}: qemu-img info`);
    await execFileP('qemu-img', ['check', '-q', '-f', 'vpc', file]).catch((err) => {
      // qemu-img cannot check vpc images ("This image format does not support checks"): info is the judge.
      if (!/does not support checks/.test(String((err as { stderr?: string }).stderr))) throw err;
    });
    let depth = 1;
    for (let content = row.content_id, name = row.file_name; ; depth++) {
      const parent = parentOf(content);
      const head = await fsp.readFile(path.join(sr.srDir, name));
      const diskType = head.readUInt32BE(60);
      if (parent === null) {
        assert.equal(diskType, 3, `${what}: the base is a dynamic VHD`);
        return depth;
      }
      assert.equal(diskType, 4, `${what}: layer ${name} is a differencing VHD`);
      const parentFile = await fsp.readFile(path.join(sr.srDir, parent));
      // Dynamic header at 512: parent unique id at 40, parent name (UTF-16BE) at 64.
      assert.ok(
        head.subarray(512 + 40, 512 + 56).equals(parentFile.subarray(68, 84)),
        `${what}: ${name} names its parent's unique id`,
      );
      const parentName = head.toString('utf16le', 512 + 64, 512 + 64 + 512).replace(/\0[\s\S]*$/, '');
      const swapped = Buffer.from(head.subarray(512 + 64, 512 + 64 + 512))
        .swap16()
        .toString('utf16le');
      assert.ok(
        parentName.includes(parent) || swapped.includes(parent),
        `${what}: ${name} names its parent's file ${parent}`,
      );
      assert.ok(
        head.toString('utf16le').includes(`.\\${parent}`),
        `${what}: a parent locator names .\\${parent}`,
      );
      content = parent;
      name = parent;
    }
  };

  test('after a snapshot, an import writes a differencing VHD of the changed blocks; every VDI and snapshot reads its own', async () => {
    const vdi = await createVdi(url(), SIZE, { image_format: 'vhd' });
    const base = Buffer.alloc(SIZE);
    seededBytes(24 * MiB, 3).copy(base);
    await importRaw(vdi.id, base);
    const model = new Map<string, Buffer>([[vdi.id, base]]);
    let live: Buffer = base;
    for (let round = 0; round < 4; round++) {
      const snap = (await api<VdiJson>(url(), 'POST', `/v1/vdis/${vdi.id}/snapshots`)).body;
      model.set(snap.id, live);
      const next = changed(live, 20 + round, 3);
      const before = await srBytes();
      await importRaw(vdi.id, next);
      const grown = (await srBytes()) - before;
      const touched = changedVhdBlocks(live, next);
      // Past the depth limit, a flattening (which rewrites the data under the layer at the limit) may run meanwhile.
      if (round + 2 <= DEPTH) {
        assert.ok(
          grown <= touched * VHD_BLOCK + 64 * KiB,
          `round ${round}: ${touched} changed 2 MiB blocks grew the SR by ${grown} bytes`,
        );
      }
      live = next;
      model.set(vdi.id, live);
      // One layer per retained snapshot, up to the depth limit (past it, the layer at the limit is rewritten flat).
      await mergesDone();
      assert.equal(
        await assertVhdFile(vdi.id, `round ${round}`),
        Math.min(round + 2, DEPTH),
        `round ${round}: the chain's depth`,
      );
    }
    // An identical import adds no block.
    const before = await srBytes();
    await importRaw(vdi.id, live);
    assert.ok((await srBytes()) - before <= 8 * KiB, 'an identical import adds no block');
    await mergesDone();

    for (const [id, want] of model) {
      await assertVhdFile(id, id);
      assert.equal(await sha256Url(`${url()}/v1/vdis/${id}/contents`), sha256(want), `${id}: raw export`);
      const vhd = path.join(sr.dataDir, 'export.vhd');
      await fsp.writeFile(
        vhd,
        Buffer.from(await (await fetch(`${url()}/v1/vdis/${id}/contents?format=vhd`)).arrayBuffer()),
      );
      const raw = path.join(sr.dataDir, 'export.raw');
      await execFileP('qemu-img', ['convert', '-f', 'vpc', '-O', 'raw', vhd, raw]);
      assert.equal(
        sha256((await fsp.readFile(raw)).subarray(0, SIZE)),
        sha256(want),
        `${id}: its vhd export`,
      );
    }

    // Deleting snapshots merges their layers (rewritten); every other disk reads its bytes.
    const ids = [...model.keys()].filter((id) => id !== vdi.id);
    for (const id of [ids[1], ids[0], ids[3]]) {
      await remove(id);
      model.delete(id);
      await mergesDone();
      for (const [other, want] of model) {
        await assertVhdFile(other, `${other} after deleting ${id}`);
        assert.equal(
          await sha256Url(`${url()}/v1/vdis/${other}/contents`),
          sha256(want),
          `${other} after deleting ${id}`,
        );
      }
    }
    await sr.server.stop('SIGKILL');
    await sr.start();
    await mergesDone();
    for (const [id, want] of model) {
      assert.equal(await sha256Url(`${url()}/v1/vdis/${id}/contents`), sha256(want), `${id} after a kill -9`);
    }
    const merges = await mergeTasks();
    assert.ok(merges.filter((t) => t.status === 'success').length >= 2, 'vhd layers were merged');
    for (const id of model.keys()) {
      await remove(id);
    }
    assert.deepEqual(await layerFiles(sr.srDir), [], 'every layer file went with the last VDI needing it');
  });
});
