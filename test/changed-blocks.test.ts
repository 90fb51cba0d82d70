/**
 * Changed blocks (`/changed-blocks?base=`, `/extents?context=dirty&since=`)
 * against a brute-force comparison of the two disks' bytes, over seeded
 * histories of imports (scattered writes, zeroed blocks, identical
 * rewrites), snapshots and clones, in every SR format; and the refusals:
 * another VDI's snapshot, content stored before digests were kept.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { api, createVdi } from './helpers/api.js';
import { bitsOf } from './helpers/bitmaps.js';
import { rounds } from './helpers/pg.js';
import { prng, seededBytes, startServer, type TestServer } from './helpers/server.js';

const BLOCK = 64 * 1024;
type ErrorBody = { error: { code: string; message: string; details?: Record<string, unknown> } };
type Bitmap = { block_size: number; bitmap: string };
type Dirty = { start: number; length: number; dirty: boolean };

/** The blocks where two disks differ, brute force (a shorter disk reads as zeros past its end). */
function bruteForce(a: Buffer, b: Buffer): boolean[] {
  const blocks = Math.ceil(b.length / BLOCK);
  const out: boolean[] = [];
  for (let i = 0; i < blocks; i++) {
    const x = Buffer.alloc(BLOCK);
    const y = Buffer.alloc(BLOCK);
    a.copy(x, 0, i * BLOCK, Math.min(a.length, (i + 1) * BLOCK));
    b.copy(y, 0, i * BLOCK, Math.min(b.length, (i + 1) * BLOCK));
    out.push(!x.equals(y));
  }
  return out;
}

function dirtyBlocksOf(extents: Dirty[], size: number): boolean[] {
  let pos = 0;
  const out: boolean[] = new Array(Math.ceil(size / BLOCK)).fill(false);
  for (const e of extents) {
    assert.equal(e.start, pos, 'extents cover the disk in order');
    assert.ok(e.length > 0);
    if (e.dirty)
      for (let b = e.start / BLOCK; b < Math.ceil((e.start + e.length) / BLOCK); b++) out[b] = true;
    pos += e.length;
  }
  assert.equal(pos, size, 'extents cover the whole disk');
  return out;
}

describe('changed blocks', () => {
  let srv: TestServer;
  before(async () => {
    srv = await startServer();
  });
  after(async () => {
    await srv.close();
  });

  const importRaw = async (id: string, body: Buffer) => {
    const res = await fetch(`${srv.url}/v1/vdis/${id}/contents?format=raw`, {
      method: 'PUT',
      body: new Uint8Array(body),
    });
    assert.equal(res.status, 200, await res.text());
  };
  const post = async (pathName: string) => {
    const res = await api<{ id: string }>(srv.url, 'POST', pathName, {});
    assert.equal(res.status, 201, JSON.stringify(res.body));
    return res.body.id;
  };
  const changed = async (id: string, base: string, size: number) => {
    const bits = await api<Bitmap>(srv.url, 'GET', `/v1/vdis/${id}/changed-blocks?base=${base}`);
    assert.equal(bits.status, 200, JSON.stringify(bits.body));
    assert.equal(bits.body.block_size, BLOCK);
    const dirty = await api<Dirty[]>(srv.url, 'GET', `/v1/vdis/${id}/extents?context=dirty&since=${base}`);
    assert.equal(dirty.status, 200, JSON.stringify(dirty.body));
    const fromBitmap = bitsOf(bits.body.bitmap, Math.ceil(size / BLOCK));
    assert.deepEqual(dirtyBlocksOf(dirty.body, size), fromBitmap, 'the two shapes give one answer');
    return fromBitmap;
  };

  const FORMATS = ['raw', 'vhd', 'qcow2'] as const;
  for (let seed = 1; seed <= rounds(20, 8); seed++) {
    const format = FORMATS[seed % 3];
    test(`history ${seed} (${format} SR): every snapshot against every later point equals a brute-force comparison`, async () => {
      const rnd = prng(seed * 7919);
      const blocks = 8 + Math.floor(rnd() * 40);
      const size = blocks * BLOCK - (rnd() < 0.3 ? 512 : 0);
      const lines: { live: string; disk: Buffer; snaps: { id: string; disk: Buffer }[] }[] = [];
      const first = (await createVdi(srv.url, size, { image_format: format })).id;
      lines.push({ live: first, disk: Buffer.alloc(size), snaps: [] });
      for (let step = 0; step < 10; step++) {
        const line = lines[Math.floor(rnd() * lines.length)];
        const r = rnd();
        if (r < 0.55) {
          const next = Buffer.from(line.disk);
          const writes = 1 + Math.floor(rnd() * 4);
          for (let w = 0; w < writes; w++) {
            const at = Math.floor(rnd() * size) & ~511;
            const len = Math.min(size - at, 512 * (1 + Math.floor(rnd() * 300)));
            const kind = rnd();
            if (kind < 0.2) next.fill(0, at, at + len);
            else if (kind < 0.35)
              line.disk.copy(next, at, at, at + len); // the same bytes again
            else seededBytes(len, seed * 1000 + step * 10 + w).copy(next, at);
          }
          await importRaw(line.live, next);
          line.disk = next;
        } else if (r < 0.85) {
          line.snaps.push({
            id: await post(`/v1/vdis/${line.live}/snapshots`),
            disk: Buffer.from(line.disk),
          });
        } else {
          const from = line.snaps.length > 0 && rnd() < 0.5 ? line.snaps[line.snaps.length - 1] : null;
          const id = await post(`/v1/vdis/${from ? from.id : line.live}/clone`);
          lines.push({ live: id, disk: Buffer.from(from ? from.disk : line.disk), snaps: [] });
        }
      }
      for (const line of lines) {
        for (const [i, snap] of line.snaps.entries()) {
          assert.deepEqual(await changed(line.live, snap.id, size), bruteForce(snap.disk, line.disk));
          for (const later of line.snaps.slice(i + 1)) {
            assert.deepEqual(await changed(later.id, snap.id, size), bruteForce(snap.disk, later.disk));
          }
        }
      }
    });
  }

  test('identical rewrites are not dirty; a block zeroed is', async () => {
    const size = 16 * BLOCK;
    const vdi = (await createVdi(srv.url, size)).id;
    const disk = seededBytes(size, 5);
    await importRaw(vdi, disk);
    const snap = await post(`/v1/vdis/${vdi}/snapshots`);
    await importRaw(vdi, disk);
    assert.deepEqual(await changed(vdi, snap, size), new Array(16).fill(false));
    const next = Buffer.from(disk);
    next.fill(0, 3 * BLOCK, 4 * BLOCK);
    next[9 * BLOCK + 100] ^= 1;
    await importRaw(vdi, next);
    const expected = new Array(16).fill(false);
    expected[3] = true;
    expected[9] = true;
    assert.deepEqual(await changed(vdi, snap, size), expected);
    const dirty = await api<Dirty[]>(srv.url, 'GET', `/v1/vdis/${vdi}/extents?context=dirty&since=${snap}`);
    assert.deepEqual(dirty.body, [
      { start: 0, length: 3 * BLOCK, dirty: false },
      { start: 3 * BLOCK, length: BLOCK, dirty: true },
      { start: 4 * BLOCK, length: 5 * BLOCK, dirty: false },
      { start: 9 * BLOCK, length: BLOCK, dirty: true },
      { start: 10 * BLOCK, length: 6 * BLOCK, dirty: false },
    ]);
  });

  test("another VDI's snapshot, a VDI that is no snapshot, no base: refused", async () => {
    const a = (await createVdi(srv.url, 4 * BLOCK)).id;
    const b = (await createVdi(srv.url, 4 * BLOCK)).id;
    const snapB = await post(`/v1/vdis/${b}/snapshots`);
    const other = await api<ErrorBody>(srv.url, 'GET', `/v1/vdis/${a}/changed-blocks?base=${snapB}`);
    assert.equal(other.status, 409);
    assert.equal(other.body.error.code, 'CHANGED_BLOCKS_UNKNOWN');
    const notSnap = await api<ErrorBody>(srv.url, 'GET', `/v1/vdis/${a}/extents?context=dirty&since=${b}`);
    assert.equal(notSnap.status, 400);
    assert.equal(notSnap.body.error.code, 'INVALID_REQUEST');
    const none = await api<ErrorBody>(srv.url, 'GET', `/v1/vdis/${a}/extents?context=dirty`);
    assert.equal(none.status, 400);
    assert.equal(none.body.error.code, 'INVALID_REQUEST');
    const missing = await api<ErrorBody>(
      srv.url,
      'GET',
      `/v1/vdis/${a}/changed-blocks?base=${crypto.randomUUID()}`,
    );
    assert.equal(missing.status, 404);
  });

  test('content stored before digests were kept: 409 CHANGED_BLOCKS_UNKNOWN, never a guess', async () => {
    const vdi = (await createVdi(srv.url, 4 * BLOCK)).id;
    await importRaw(vdi, seededBytes(4 * BLOCK, 9));
    const snap = await post(`/v1/vdis/${vdi}/snapshots`);
    // What the migration leaves on a row committed before digests existed.
    srv.services.db.prepare('UPDATE vdis SET digest_file = NULL WHERE id = ?').run(snap);
    await importRaw(vdi, seededBytes(4 * BLOCK, 10));
    const res = await api<ErrorBody>(srv.url, 'GET', `/v1/vdis/${vdi}/changed-blocks?base=${snap}`);
    assert.equal(res.status, 409);
    assert.equal(res.body.error.code, 'CHANGED_BLOCKS_UNKNOWN');
    const dirty = await api<ErrorBody>(srv.url, 'GET', `/v1/vdis/${vdi}/extents?context=dirty&since=${snap}`);
    assert.equal(dirty.status, 409);
  });
});
