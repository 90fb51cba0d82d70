/**
 * kill -9 at seeded random moments during uploads and finalizes: after each
 * restart the session resumes to a byte-exact VDI, or the VDI keeps its
 * previous content. Never anything else.
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

const MiB = 1024 * 1024;
const SIZE = 8 * MiB;
const CASES = rounds(20, 8);
type Task = { id: string; status: string; error: { code: string } | null };

describe('crash safety of resumable uploads', () => {
  const rig = restartableServer();
  const rnd = prng(20261125);

  /** Sends every byte of `image` not yet received, in 1 MiB chunks, in a shuffled order. */
  async function sendMissing(
    t: TransferJson,
    image: Buffer,
    received: [number, number][] = [],
  ): Promise<void> {
    const have = (s: number, e: number) => received.some(([a, b]) => a <= s && e <= b);
    const chunks = [...Array(Math.ceil(image.length / MiB)).keys()].sort(() => rnd() - 0.5);
    for (const k of chunks) {
      const s = k * MiB;
      const e = Math.min(image.length, s + MiB);
      if (have(s, e)) continue;
      const url = t.url.replace(/^http:\/\/[^/]+/, rig.server.url);
      const res = await fetch(url, {
        method: 'PUT',
        headers: { 'content-range': `bytes ${s}-${e - 1}/${image.length}` },
        body: new Uint8Array(image.subarray(s, e)),
      });
      assert.equal(res.status, 200, await res.clone().text());
    }
  }

  // Twenty restarts of a spawned server: minutes on a loaded machine, more than the default per test.
  test(`${CASES} kills at random moments of uploads and finalizes`, { timeout: 600_000 }, async () => {
    const vdiId = (await createVdi(rig.server.url, SIZE)).id;
    let current = await sha256Url(`${rig.server.url}/v1/vdis/${vdiId}/contents`);
    let resumedUploads = 0;
    let finalizesCompleted = 0;

    for (let i = 0; i < CASES; i++) {
      const duringFinalize = i % 2 === 1;
      const raw = seededBytes(SIZE, 1000 + i);
      raw.fill(0, 2 * MiB, 3 * MiB);
      const rawSha = createHash('sha256').update(raw).digest('hex');
      // Finalizes convert a qcow2 upload, which takes long enough to be hit
      // mid-way; uploads cut mid-way are raw, or vhd and qcow2 converting into
      // the disk as they arrive.
      const format = duringFinalize ? 'qcow2' : (['raw', 'vhd', 'qcow2'] as const)[(i / 2) % 3];
      let image = raw;
      if (format !== 'raw') {
        const rawFile = path.join(rig.work, `case-${i}.raw`);
        await fsp.writeFile(rawFile, raw);
        const out = `${rawFile}.${format}`;
        await execFileP('qemu-img', [
          'convert',
          '-f',
          'raw',
          '-O',
          format === 'vhd' ? 'vpc' : format,
          rawFile,
          out,
        ]);
        image = await fsp.readFile(out);
      }
      const created = await api<TransferJson>(rig.server.url, 'POST', '/v1/transfers', {
        vdi: vdiId,
        direction: 'upload',
        format,
        size: image.length,
      });
      assert.equal(created.status, 201);
      const t = created.body;

      if (duringFinalize) {
        await sendMissing(t, image);
        const killAfterMs = Math.floor(rnd() * 120);
        const finalizing = fetch(`${rig.server.url}/v1/transfers/${t.id}/finalize?token=${t.token}`, {
          method: 'POST',
        }).catch(() => null);
        await sleep(killAfterMs);
        await rig.restart();
        await finalizing;
        const state = (await api<TransferJson>(rig.server.url, 'GET', `/v1/transfers/${t.id}`)).body;
        if (state.state === 'open') {
          // the kill came before finalize was recorded: the upload is whole, finalize again
          await api(rig.server.url, 'POST', `/v1/transfers/${t.id}/finalize?token=${t.token}`);
        }
      } else {
        const killAfterMs = 20 + Math.floor(rnd() * 200);
        const sending = sendMissing(t, image).catch(() => null);
        await sleep(killAfterMs);
        await rig.restart();
        await sending;
        // the VDI is untouched by a half-done upload
        assert.equal(await sha256Url(`${rig.server.url}/v1/vdis/${vdiId}/contents`), current);
        const state = (
          await api<TransferJson>(rig.server.url, 'GET', `/v1/transfers/${t.id}?token=${t.token}`)
        ).body;
        assert.equal(state.state, 'open', 'the session survives the crash');
        if (state.received.length) resumedUploads++;
        const head = await fetch(`${rig.server.url}/v1/transfers/${t.id}/data?token=${t.token}`, {
          method: 'HEAD',
        });
        assert.equal(head.status, 200);
        await sendMissing(t, image, state.received);
        await api(rig.server.url, 'POST', `/v1/transfers/${t.id}/finalize?token=${t.token}`);
      }

      const task = (await api<Task>(rig.server.url, 'GET', `/v1/tasks/${t.task_id}?wait=60`)).body;
      const now = await sha256Url(`${rig.server.url}/v1/vdis/${vdiId}/contents`);
      if (task.status === 'success') {
        assert.equal(now, rawSha, `case ${i}: a committed upload is byte-exact`);
        if (duringFinalize) finalizesCompleted++;
        current = now;
      } else {
        assert.equal(task.error?.code, 'INTERRUPTED', `case ${i}: ${JSON.stringify(task)}`);
        assert.equal(now, current, `case ${i}: a failed finalize leaves the previous content`);
      }
      const staging = await fsp.readdir(path.join(rig.dataDir, 'srs', 'local', '.staging'));
      assert.deepEqual(staging, [], `case ${i}: no staging file outlives its session`);
    }
    assert.ok(resumedUploads > 0, 'some uploads were cut after bytes had been recorded, and resumed');
    assert.ok(finalizesCompleted > 0, 'some finalizes cut by a kill completed after the restart');
  });
});
