/**
 * A qcow2 delta uploaded into a raw VDI streams its clusters into a raw file
 * as they arrive, and its commit takes that file as the new layer (its bytes
 * are written once, not staged then copied). kill -9 at seeded random
 * moments of such uploads and of their finalizes: after each restart the
 * session resumes (or its finalize runs again) to a VDI holding exactly the
 * delta over its base, or the VDI keeps what it held. Never anything else,
 * and no staged file outlives its session.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { api, createVdi, execFileP, sha256Url, type TransferJson } from './helpers/api.js';
import { rounds } from './helpers/pg.js';
import { prng, restartableServer, seededBytes } from './helpers/server.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const BLOCK = 64 * KiB;
const SIZE = 64 * MiB;
const CASES = rounds(8, 4);
type Task = {
  id: string;
  status: string;
  error: { code: string } | null;
  result: { bytes_streamed?: number } | null;
};

describe('crash safety of a qcow2 delta streamed into its layer', () => {
  const rig = restartableServer();
  const rnd = prng(20261206);

  /** [start, end) of `image` in one streamed PUT, 256 KiB at a time with pauses: a kill lands mid-stream. */
  async function putSlowly(t: TransferJson, image: Buffer, start: number, end: number): Promise<void> {
    async function* body() {
      for (let at = start; at < end; at += 256 * KiB) {
        yield image.subarray(at, Math.min(end, at + 256 * KiB));
        await sleep(4);
      }
    }
    const res = await fetch(t.url.replace(/^http:\/\/[^/]+/, rig.server.url), {
      method: 'PUT',
      headers: { 'content-range': `bytes ${start}-${end - 1}/${image.length}` },
      body: body(),
      duplex: 'half',
    } as unknown as RequestInit);
    assert.equal(res.status, 200, await res.text());
  }

  /** Every range of `image` the session has not received. */
  async function sendMissing(t: TransferJson, image: Buffer): Promise<void> {
    const state = (await api<TransferJson>(rig.server.url, 'GET', `/v1/transfers/${t.id}?token=${t.token}`))
      .body;
    let pos = 0;
    for (const [s, e] of [...state.received, [image.length, image.length]]) {
      if (s > pos) await putSlowly(t, image, pos, s);
      pos = Math.max(pos, e);
    }
  }

  test(`${CASES} kills at random moments of streamed delta uploads and their finalizes`, {
    timeout: 600_000,
  }, async () => {
    const vdi = (await createVdi(rig.server.url, SIZE)).id;
    // 24 MiB of data in the 64 MiB disk, the rest holes.
    let disk = Buffer.alloc(SIZE);
    for (const [at, seed] of [
      [0, 1],
      [20 * MiB, 2],
      [44 * MiB, 3],
    ]) {
      seededBytes(8 * MiB, seed).copy(disk, at);
    }
    const put = await fetch(`${rig.server.url}/v1/vdis/${vdi}/contents?format=raw`, {
      method: 'PUT',
      body: new Uint8Array(disk),
    });
    assert.equal(put.status, 200, await put.text());
    let current = createHash('sha256').update(disk).digest('hex');
    let streamedCommits = 0;
    let finalizesCompleted = 0;
    let resumedUploads = 0;
    let previousSnapshot: string | null = null;

    for (let i = 0; i < CASES; i++) {
      const duringFinalize = i % 2 === 1;
      const baseSha = current;
      // The base: a snapshot of what the VDI holds now (the previous one goes, as a push's settle does).
      const snap = await api<{ id: string }>(rig.server.url, 'POST', `/v1/vdis/${vdi}/snapshots`, {});
      assert.equal(snap.status, 201);
      if (previousSnapshot)
        assert.equal((await api(rig.server.url, 'DELETE', `/v1/vdis/${previousSnapshot}`)).status, 204);
      previousSnapshot = snap.body.id;

      // Changes in whole 64 KiB blocks: data over data, data in holes, zeros over data.
      const next = Buffer.from(disk);
      for (let k = 0; k < 6; k++) {
        const at = Math.floor(rnd() * (SIZE / BLOCK - 32)) * BLOCK;
        const length = (1 + Math.floor(rnd() * 24)) * BLOCK;
        if (k === 5) next.fill(0, at, at + length);
        else seededBytes(length, 100 * i + k).copy(next, at);
      }
      const nextSha = createHash('sha256').update(next).digest('hex');
      const baseFile = path.join(rig.work, `base-${i}.raw`);
      const nextFile = path.join(rig.work, `next-${i}.raw`);
      const deltaFile = path.join(rig.work, `delta-${i}.qcow2`);
      await fsp.writeFile(baseFile, disk);
      await fsp.writeFile(nextFile, next);
      await execFileP('qemu-img', [
        'convert',
        '-f',
        'raw',
        '-O',
        'qcow2',
        '-B',
        baseFile,
        '-F',
        'raw',
        nextFile,
        deltaFile,
      ]);
      const delta = await fsp.readFile(deltaFile);
      await Promise.all([baseFile, nextFile, deltaFile].map((f) => fsp.rm(f)));

      const created = await api<TransferJson>(rig.server.url, 'POST', '/v1/transfers', {
        vdi,
        direction: 'upload',
        format: 'qcow2',
        base: snap.body.id,
        size: delta.length,
      });
      assert.equal(created.status, 201, JSON.stringify(created.body));
      const t = created.body;
      const finalize = () =>
        fetch(`${rig.server.url}/v1/transfers/${t.id}/finalize?token=${t.token}`, { method: 'POST' }).catch(
          () => null,
        );

      if (duringFinalize) {
        await putSlowly(t, delta, 0, delta.length);
        const finalizing = finalize();
        await sleep(Math.floor(rnd() * 80));
        await rig.restart();
        await finalizing;
        const state = (
          await api<TransferJson>(rig.server.url, 'GET', `/v1/transfers/${t.id}?token=${t.token}`)
        ).body;
        // The kill came before the finalize was recorded: the upload is whole, finalize again.
        if (state.state === 'open') await finalize();
      } else {
        // A first part arrives whole (recorded, and streamed into the layer's file), then the kill cuts the rest.
        const half = Math.floor((delta.length * (0.2 + 0.6 * rnd())) / 512) * 512;
        await putSlowly(t, delta, 0, half);
        const sending = putSlowly(t, delta, half, delta.length).catch(() => null);
        await sleep(Math.floor(rnd() * 40));
        await rig.restart();
        await sending;
        assert.equal(
          await sha256Url(`${rig.server.url}/v1/vdis/${vdi}/contents`),
          current,
          `case ${i}: the VDI is untouched by a half-done upload`,
        );
        const state = (
          await api<TransferJson>(rig.server.url, 'GET', `/v1/transfers/${t.id}?token=${t.token}`)
        ).body;
        assert.equal(state.state, 'open', 'the session survives the crash');
        if (state.received.length) resumedUploads++;
        await sendMissing(t, delta);
        await finalize();
      }

      const task = (await api<Task>(rig.server.url, 'GET', `/v1/tasks/${t.task_id}?wait=60`)).body;
      const now = await sha256Url(`${rig.server.url}/v1/vdis/${vdi}/contents`);
      if (task.status === 'success') {
        assert.equal(now, nextSha, `case ${i}: a committed delta gives the disk it describes`);
        if ((task.result?.bytes_streamed ?? 0) > 0) streamedCommits++;
        if (duringFinalize) finalizesCompleted++;
        current = now;
        disk = next;
      } else {
        assert.equal(task.error?.code, 'INTERRUPTED', `case ${i}: ${JSON.stringify(task)}`);
        assert.equal(now, current, `case ${i}: a failed finalize leaves the previous content`);
      }
      // The snapshot still reads as the base it was.
      assert.equal(
        await sha256Url(`${rig.server.url}/v1/vdis/${snap.body.id}/contents`),
        baseSha,
        `case ${i}: the base`,
      );
      const staging = await fsp.readdir(path.join(rig.dataDir, 'srs', 'local', '.staging'));
      assert.deepEqual(staging, [], `case ${i}: no staging file outlives its session`);
    }
    assert.ok(streamedCommits > 0, 'some deltas streamed into their layer');
    assert.ok(finalizesCompleted > 0, 'some finalizes cut by a kill completed after the restart');
    assert.ok(resumedUploads > 0, 'some uploads were cut after bytes had been recorded, and resumed');
  });
});
