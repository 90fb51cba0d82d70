/**
 * Changed blocks through merges (issue 12, points 4 and 5): 50 seeded
 * histories of writes, snapshots, snapshot deletes (which merge layers, some
 * while the next steps run), clones and chains past a depth limit of 3
 * (flattened). After every step, every VDI and snapshot reads as a model kept
 * here, and the changed blocks between every snapshot and every point of its
 * own VDI's history (both shapes) equal a brute-force comparison of the two
 * disks; a snapshot of another VDI is 409 CHANGED_BLOCKS_UNKNOWN.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { api, createVdi } from './helpers/api.js';
import { bitsOf } from './helpers/bitmaps.js';
import { rounds } from './helpers/pg.js';
import { prng, seededBytes, startServer, type TestServer } from './helpers/server.js';

const BLOCK = 64 * 1024;
const HISTORIES = rounds(50, 15);

type Bitmap = { block_size: number; bitmap: string };
type Dirty = { start: number; length: number; dirty: boolean };

/** A VDI of the model: its bytes, and the VDI it is a snapshot of (null for a writable one). */
interface Disk {
  id: string;
  bytes: Buffer;
  snapshotOf: string | null;
}

const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

function bruteForce(a: Buffer, b: Buffer): boolean[] {
  return Array.from(
    { length: Math.ceil(b.length / BLOCK) },
    (_, i) => a.compare(b, i * BLOCK, (i + 1) * BLOCK, i * BLOCK, (i + 1) * BLOCK) !== 0,
  );
}

function dirtyBlocks(extents: Dirty[], size: number): boolean[] {
  const out: boolean[] = new Array(Math.ceil(size / BLOCK)).fill(false);
  let pos = 0;
  for (const e of extents) {
    assert.equal(e.start, pos, 'extents cover the disk in order');
    if (e.dirty) for (let b = e.start / BLOCK; b < (e.start + e.length) / BLOCK; b++) out[b] = true;
    pos += e.length;
  }
  assert.equal(pos, size);
  return out;
}

describe('changed blocks through merges: seeded histories', () => {
  let srv: TestServer;
  before(async () => {
    srv = await startServer({ config: { maxChainDepth: 3 } });
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
  const post = async (path: string) => {
    const res = await api<{ id: string }>(srv.url, 'POST', path, {});
    assert.equal(res.status, 201, JSON.stringify(res.body));
    return res.body.id;
  };
  const readAll = async (id: string) =>
    Buffer.from(await (await fetch(`${srv.url}/v1/vdis/${id}/contents`)).arrayBuffer());

  /** Every disk reads as the model; every snapshot against every point of its VDI's history, brute force. */
  async function check(disks: Map<string, Disk>, what: string): Promise<void> {
    for (const d of disks.values())
      assert.equal(sha256(await readAll(d.id)), sha256(d.bytes), `${what}: ${d.id}`);
    for (const base of disks.values()) {
      if (base.snapshotOf === null) continue;
      for (const d of disks.values()) {
        const origin = d.snapshotOf ?? d.id;
        if (d === base) continue;
        const q = `/v1/vdis/${d.id}/changed-blocks?base=${base.id}`;
        const bits = await api<Bitmap | { error: { code: string } }>(srv.url, 'GET', q);
        if (origin !== base.snapshotOf) {
          assert.equal(bits.status, 409, `${what}: ${q}`);
          assert.equal((bits.body as { error: { code: string } }).error.code, 'CHANGED_BLOCKS_UNKNOWN');
          continue;
        }
        assert.equal(bits.status, 200, `${what}: ${q}: ${JSON.stringify(bits.body)}`);
        const want = bruteForce(base.bytes, d.bytes);
        assert.deepEqual(bitsOf((bits.body as Bitmap).bitmap, want.length), want, `${what}: ${q}`);
        const dirty = await api<Dirty[]>(
          srv.url,
          'GET',
          `/v1/vdis/${d.id}/extents?context=dirty&since=${base.id}`,
        );
        assert.deepEqual(dirtyBlocks(dirty.body, d.bytes.length), want, `${what}: dirty extents of ${d.id}`);
      }
    }
  }

  // Every step of every history is checked with qemu-img: minutes on a loaded machine.
  test(`${HISTORIES} seeded histories of writes, snapshots, merges and clones`, {
    timeout: 600_000,
  }, async (t) => {
    let merged = 0;
    let flattened = 0;
    for (let seed = 1; seed <= HISTORIES; seed++) {
      const rnd = prng(seed * 104_729);
      const pick = <T>(xs: T[]): T => xs[Math.floor(rnd() * xs.length)];
      const blocks = 4 + Math.floor(rnd() * 12);
      const size = blocks * BLOCK;
      const disks = new Map<string, Disk>();
      const first = await createVdi(srv.url, size, { image_format: 'raw' });
      disks.set(first.id, { id: first.id, bytes: Buffer.alloc(size), snapshotOf: null });
      const steps = 8 + Math.floor(rnd() * 8);
      const before = srv.services.tasks.list({}).filter((t) => t.type === 'merge');
      for (let step = 0; step < steps; step++) {
        const writable = [...disks.values()].filter((d) => d.snapshotOf === null);
        const snaps = [...disks.values()].filter((d) => d.snapshotOf !== null);
        const r = rnd();
        let what: string;
        if (r < 0.4 || snaps.length === 0) {
          // A write: a few blocks new, zeroed or rewritten with what they held.
          const d = pick(writable);
          const next = Buffer.from(d.bytes);
          for (let n = 1 + Math.floor(rnd() * 3); n > 0; n--) {
            const b = Math.floor(rnd() * blocks) * BLOCK;
            const kind = rnd();
            if (kind < 0.6) seededBytes(BLOCK, seed * 1000 + step * 10 + n).copy(next, b);
            else if (kind < 0.8) next.fill(0, b, b + BLOCK);
          }
          await importRaw(d.id, next);
          d.bytes = next;
          what = `write to ${d.id}`;
          if (rnd() < 0.5) {
            const s = await post(`/v1/vdis/${d.id}/snapshots`);
            disks.set(s, { id: s, bytes: d.bytes, snapshotOf: d.id });
            what += ' and a snapshot';
          }
        } else if (r < 0.7) {
          const s = pick(snaps);
          assert.equal((await fetch(`${srv.url}/v1/vdis/${s.id}`, { method: 'DELETE' })).status, 204);
          disks.delete(s.id);
          what = `delete of snapshot ${s.id}`;
        } else if (r < 0.85 && disks.size < 8) {
          const from = pick([...disks.values()]);
          const c = await post(`/v1/vdis/${from.id}/clone`);
          disks.set(c, { id: c, bytes: from.bytes, snapshotOf: null });
          what = `clone of ${from.id}`;
        } else {
          const d = pick(writable);
          const s = await post(`/v1/vdis/${d.id}/snapshots`);
          disks.set(s, { id: s, bytes: d.bytes, snapshotOf: d.id });
          what = `snapshot of ${d.id}`;
        }
        // Half the time the merges this step started run on under the checks.
        if (rnd() < 0.5) await srv.services.merges.idle();
        await check(disks, `history ${seed}, step ${step} (${what})`);
      }
      await srv.services.merges.idle();
      await check(disks, `history ${seed}, at its end`);
      const tasks = srv.services.tasks
        .list({})
        .filter((t) => t.type === 'merge' && !before.some((b) => b.id === t.id));
      for (const m of tasks) {
        assert.ok(m.status === 'success' || m.error?.message.includes('gave way'), JSON.stringify(m));
        if (m.status === 'success' && m.result?.kind === 'down') merged++;
        if (m.status === 'success' && m.result?.kind === 'flatten') flattened++;
      }
      for (const d of disks.values()) await fetch(`${srv.url}/v1/vdis/${d.id}`, { method: 'DELETE' });
    }
    t.diagnostic(`${merged} down merges and ${flattened} flattenings ran`);
    assert.ok(merged > 0 && flattened > 0, `merges ran (${merged} down, ${flattened} flattened)`);
  });
});
