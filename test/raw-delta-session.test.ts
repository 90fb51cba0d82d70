/**
 * Raw chunks against a base: an upload session opened with `format: raw`
 * and `base` (a snapshot, or `current`) takes only the ranges that changed,
 * as a backup agent restores the dirty extents it read
 * (`extents?context=dirty&since=` and ranged GETs); what it does not write
 * keeps the VDI's content, and its finalize lays what it wrote over that
 * content as a layer (after a snapshot the commit costs the writes, not the
 * disk). The base is checked at creation (409 BASE_MISMATCH) and again at
 * finalize; a checksum (of a whole stream) is refused, and so is raw
 * with a base on a one-shot PUT, which cannot leave ranges out.
 */
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import { after, before, describe, test } from 'node:test';
import { api, createVdi } from './helpers/api.js';
import { bitsSet } from './helpers/bitmaps.js';
import { seededBytes, startServer, type TestServer } from './helpers/server.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;

type Session = { id: string; url: string; size: number; base: string | null };
type Task = { status: string; result: Record<string, unknown> | null; error: { code: string } | null };
type ErrorBody = { error: { code: string; message: string } };

describe('raw chunks against a base', () => {
  let srv: TestServer;
  before(async () => {
    srv = await startServer();
  });
  after(async () => {
    await srv.close();
    await fsp.rm(srv.dataDir, { recursive: true, force: true });
  });

  const contents = async (id: string) => {
    const res = await fetch(`${srv.url}/v1/vdis/${id}/contents?format=raw`);
    assert.equal(res.status, 200);
    return Buffer.from(await res.arrayBuffer());
  };
  /** A VDI holding seeded bytes, and a snapshot of it. */
  const snapshotted = async (seed: number) => {
    const id = (await createVdi(srv.url, SIZE)).id;
    const original = seededBytes(SIZE, seed);
    const put = await fetch(`${srv.url}/v1/vdis/${id}/contents?format=raw`, {
      method: 'PUT',
      body: new Uint8Array(original),
    });
    assert.equal(put.status, 200);
    const snap = await api<{ id: string }>(srv.url, 'POST', `/v1/vdis/${id}/snapshots`, {});
    assert.equal(snap.status, 201);
    return { id, original, snap: snap.body.id };
  };
  const open = (vdi: string, base: string, extra: Record<string, unknown> = {}) =>
    api<Session>(srv.url, 'POST', '/v1/transfers', {
      vdi,
      direction: 'upload',
      format: 'raw',
      base,
      ...extra,
    });
  const chunk = async (s: Session, at: number, bytes: Buffer) => {
    const res = await fetch(s.url, {
      method: 'PUT',
      headers: { 'content-range': `bytes ${at}-${at + bytes.length - 1}/${SIZE}` },
      body: new Uint8Array(bytes),
    });
    assert.equal(res.status, 200, await res.text());
  };
  const finalize = async (s: Session) => {
    const res = await fetch(`${s.url.replace('/data?', '/finalize?')}&wait=60`, { method: 'POST' });
    return (await res.json()) as Task;
  };

  test("the ranges written replace the VDI's, the rest keeps its content; the snapshot keeps the old bytes; the changed blocks are the writes'", async () => {
    const { id, original, snap } = await snapshotted(60);
    const opened = await open(id, snap);
    assert.equal(opened.status, 201, JSON.stringify(opened.body));
    assert.equal(opened.body.size, SIZE, "the session's size is the disk's");
    assert.equal(opened.body.base, snap);
    const a = seededBytes(MiB + 4096, 61);
    const b = seededBytes(64 * 1024, 62);
    await chunk(opened.body, 5 * MiB - 4096, a);
    await chunk(opened.body, SIZE - b.length, b);
    const task = await finalize(opened.body);
    assert.equal(task.status, 'success', JSON.stringify(task));
    assert.equal(task.result?.base, snap);
    const want = Buffer.from(original);
    a.copy(want, 5 * MiB - 4096);
    b.copy(want, SIZE - b.length);
    assert.ok((await contents(id)).equals(want), 'the VDI reads as its content with the chunks laid over');
    assert.ok((await contents(snap)).equals(original), 'the snapshot reads as before');
    const bits = await api<{ block_size: number; bitmap: string }>(
      srv.url,
      'GET',
      `/v1/vdis/${id}/changed-blocks?base=${snap}`,
    );
    assert.equal(bitsSet(bits.body.bitmap), 1 + 16 + 1, 'the 64 KiB blocks the chunks touch, no other');
  });

  test('base=current takes no check; a session that writes nothing commits the VDI unchanged', async () => {
    const { id, original } = await snapshotted(63);
    const opened = await open(id, 'current');
    assert.equal(opened.status, 201, JSON.stringify(opened.body));
    const task = await finalize(opened.body);
    assert.equal(task.status, 'success', JSON.stringify(task));
    assert.ok((await contents(id)).equals(original));
  });

  test('the session holds the VDI meanwhile; once the VDI changed since the base, a session against it is 409 BASE_MISMATCH', async () => {
    const { id, snap } = await snapshotted(64);
    const opened = await open(id, snap);
    assert.equal(opened.status, 201);
    await chunk(opened.body, 0, seededBytes(MiB, 65));
    const other = await fetch(`${srv.url}/v1/vdis/${id}/contents?format=raw`, {
      method: 'PUT',
      body: new Uint8Array(seededBytes(SIZE, 66)),
    });
    // The session holds the VDI's writer: another import is refused meanwhile.
    assert.equal(other.status, 409);
    assert.equal((await api(srv.url, 'DELETE', `/v1/transfers/${opened.body.id}`)).status, 200);
    const put = await fetch(`${srv.url}/v1/vdis/${id}/contents?format=raw`, {
      method: 'PUT',
      body: new Uint8Array(seededBytes(SIZE, 66)),
    });
    assert.equal(put.status, 200);
    const late = await api<ErrorBody>(srv.url, 'POST', '/v1/transfers', {
      vdi: id,
      direction: 'upload',
      format: 'raw',
      base: snap,
    });
    assert.equal(late.status, 409, JSON.stringify(late.body));
    assert.equal(late.body.error.code, 'BASE_MISMATCH');
  });

  test('refused: a checksum with raw chunks against a base, raw with a base on a one-shot PUT, a base that is not a snapshot', async () => {
    const { id, snap } = await snapshotted(67);
    const withSum = await api<ErrorBody>(srv.url, 'POST', '/v1/transfers', {
      vdi: id,
      direction: 'upload',
      format: 'raw',
      base: snap,
      checksum: `sha256:${'0'.repeat(64)}`,
    });
    assert.equal(withSum.status, 400, JSON.stringify(withSum.body));
    assert.match(withSum.body.error.message, /leave checksum out/);
    const oneShot = await fetch(`${srv.url}/v1/vdis/${id}/contents?format=raw&base=${snap}`, {
      method: 'PUT',
      body: new Uint8Array(512),
    });
    assert.equal(oneShot.status, 400);
    assert.match(
      ((await oneShot.json()) as ErrorBody).error.message,
      /upload session opened with format raw/,
    );
    const notSnap = await api<ErrorBody>(srv.url, 'POST', '/v1/transfers', {
      vdi: id,
      direction: 'upload',
      format: 'raw',
      base: id,
    });
    assert.equal(notSnap.status, 400, JSON.stringify(notSnap.body));
  });
});
