/**
 * Chains at rest in a raw SR (docs/design.md, "Chains at rest"): after a
 * snapshot, an import costs space for the blocks it changes, not for the
 * disk, through every import path; identical blocks add nothing; every VDI
 * and snapshot keeps reading its own bytes, through exports, ranges,
 * extents and checksums, across deletes, clones, resizes and a kill -9.
 */
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import { api, createVdi, sha256Url, type TransferJson } from './helpers/api.js';
import { chainChecks, layerFiles, sha256, spawnedSr } from './helpers/chain-checks.js';
import { prng, seededBytes } from './helpers/server.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 32 * MiB;
/** Data in the first 24 MiB: what a whole-disk copy per import would cost. */
const DATA = 24 * MiB;

type VdiJson = { id: string; generation: number; virtual_size: number; is_snapshot: boolean };

/** `disk` with a few scattered 64 KiB-aligned writes (and one zeroed block) from `seed`. */
function scattered(disk: Buffer, seed: number, writes = 4): Buffer {
  const out = Buffer.from(disk);
  const rnd = prng(seed);
  for (let i = 0; i < writes; i++) {
    const at = Math.floor(rnd() * (SIZE / (64 * KiB) - 2)) * 64 * KiB;
    seededBytes(64 * KiB + 4096, seed * 100 + i).copy(out, at);
  }
  out.fill(0, 64 * KiB * (seed % 8), 64 * KiB * ((seed % 8) + 1)); // zeros over the parent's data
  return out;
}

describe('chains at rest (raw SR)', () => {
  const sr = spawnedSr();
  const checks = chainChecks(sr);
  const { importRaw, snapshot, remove, srBytes } = checks;
  const url = () => sr.url;
  const importBySession = async (id: string, body: Buffer) => {
    const t = (
      await api<TransferJson>(url(), 'POST', '/v1/transfers', {
        vdi: id,
        direction: 'upload',
        format: 'raw',
        size: body.length,
      })
    ).body;
    for (let at = 0; at < body.length; at += 8 * MiB) {
      const chunk = body.subarray(at, at + 8 * MiB);
      const res = await fetch(t.url, {
        method: 'PUT',
        headers: { 'content-range': `bytes ${at}-${at + chunk.length - 1}/${body.length}` },
        body: new Uint8Array(chunk),
      });
      assert.ok(res.ok, await res.text());
    }
    const done = await api<{ status: string }>(
      url(),
      'POST',
      `/v1/transfers/${t.id}/finalize?token=${t.token}&wait=60`,
    );
    assert.equal(done.body.status, 'success', JSON.stringify(done.body));
  };
  const importByXapi = async (id: string, body: Buffer) => {
    const res = await fetch(`${url()}/import_raw_vdi?vdi=${id}&format=raw`, {
      method: 'PUT',
      body: new Uint8Array(body),
    });
    assert.ok(res.ok, await res.text());
  };
  const shaOf = (id: string) => sha256Url(`${url()}/v1/vdis/${id}/contents`);
  /** Every byte, a ranged read, the extents and the checksum of a VDI against the model. */
  const assertReads = async (id: string, want: Buffer, what: string) => {
    await checks.assertReads(id, want, what);
    const extents = (
      await api<{ start: number; length: number; zero: boolean }[]>(url(), 'GET', `/v1/vdis/${id}/extents`)
    ).body;
    for (const e of extents.filter((x) => x.zero)) {
      assert.ok(
        want.subarray(e.start, e.start + e.length).every((b) => b === 0),
        `${what}: zero extent at ${e.start}`,
      );
    }
  };

  test('after a snapshot, imports by every path cost the changed blocks, not the disk; every snapshot reads its own', async () => {
    const vdi = await createVdi(url(), SIZE);
    const base = Buffer.alloc(SIZE);
    seededBytes(DATA, 1).copy(base);
    await importRaw(vdi.id, base);
    const model = new Map<string, Buffer>([[vdi.id, base]]);
    let live: Buffer = base;

    const paths = [importRaw, importBySession, importByXapi, importRaw, importBySession];
    for (const [round, importInto] of paths.entries()) {
      const snap = await snapshot(vdi.id);
      model.set(snap.id, live);
      const next = scattered(live, round + 2);
      const before = await srBytes();
      await importInto(vdi.id, next);
      const grown = (await srBytes()) - before;
      // 4 writes of 68 KiB touch at most 8 blocks of 64 KiB; zeros cost nothing.
      assert.ok(
        grown <= 8 * 64 * KiB + 64 * KiB,
        `round ${round} (${importInto.name}) grew the SR by ${grown} bytes`,
      );
      live = next;
      model.set(vdi.id, live);
    }
    for (const [id, want] of model) await assertReads(id, want, id === vdi.id ? 'the VDI' : `snapshot ${id}`);

    // Rewriting the same bytes adds nothing, with snapshots retained.
    const before = await srBytes();
    await importRaw(vdi.id, live);
    assert.ok((await srBytes()) - before <= 0, 'an identical import adds no block');
    await assertReads(vdi.id, live, 'the VDI after an identical import');

    // A clone of a middle snapshot is written over the shared content.
    const middle = [...model.keys()][2];
    const clone = (await api<VdiJson>(url(), 'POST', `/v1/vdis/${middle}/clone`)).body;
    const cloned = scattered(model.get(middle) as Buffer, 40);
    const beforeClone = await srBytes();
    await importRaw(clone.id, cloned);
    assert.ok((await srBytes()) - beforeClone <= 9 * 64 * KiB, 'a clone writes its changes only');
    model.set(clone.id, cloned);

    // A resize after a snapshot: the new tail reads as zeros, the rest as before.
    const grownSize = SIZE + 8 * MiB;
    assert.equal((await api(url(), 'PATCH', `/v1/vdis/${vdi.id}`, { virtual_size: grownSize })).status, 200);
    live = Buffer.concat([live, Buffer.alloc(8 * MiB)]);
    model.set(vdi.id, live);
    await assertReads(vdi.id, live, 'the resized VDI');

    // kill -9, restart: every VDI and snapshot reads as before.
    await sr.server.stop('SIGKILL');
    await sr.start();
    for (const [id, want] of model) await assertReads(id, want, `${id} after a kill -9`);

    // Deletes in any order: the rest read on; at the end nothing is left.
    const ids = [...model.keys()];
    const order = [ids[3], vdi.id, ids[1], clone.id, ids[5], ids[2], ids[4], middle, ...ids];
    const gone = new Set<string>();
    for (const id of order) {
      if (gone.has(id)) continue;
      await remove(id);
      gone.add(id);
      model.delete(id);
      for (const [other, want] of model)
        assert.equal(await shaOf(other), sha256(want), `${other} after deleting ${id}`);
    }
    assert.deepEqual(await layerFiles(sr.srDir), [], 'every layer file went with the last VDI needing it');
  });

  test('a VDI without snapshots stays one flat file per commit', async () => {
    const vdi = await createVdi(url(), SIZE);
    const data = Buffer.alloc(SIZE);
    seededBytes(DATA, 9).copy(data);
    await importRaw(vdi.id, data);
    await importRaw(vdi.id, scattered(data, 3));
    const v = (await api<VdiJson>(url(), 'GET', `/v1/vdis/${vdi.id}`)).body;
    const files = (await fsp.readdir(sr.srDir)).filter((n) => n.startsWith(vdi.id) && n.endsWith('.raw'));
    assert.deepEqual(files, [`${vdi.id}.g${v.generation}.raw`]);
    const st = await fsp.stat(path.join(sr.srDir, files[0]));
    assert.ok(st.blocks * 512 >= DATA - 64 * KiB, 'the whole disk is in its one file');
    await remove(vdi.id);
  });
});
