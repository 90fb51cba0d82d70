/**
 * DirectWriter's contract, on real files, with O_DIRECT and without: after
 * flush() the file holds exactly the bytes given, at their places, later
 * ones over earlier ones; a byte never given keeps what the file had.
 */
import assert from 'node:assert/strict';
import { constants, promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { DIRECT_ALIGN, DIRECT_BUFFER_BYTES, DirectWriter } from '../src/image/direct-writer.js';
import { sparseSupported } from '../src/image/sparse.js';
import { prng, seededBytes } from './helpers/random.js';
import { tempDir } from './helpers/server.js';

const MiB = 1024 * 1024;
const FILE_BYTES = 3 * DIRECT_BUFFER_BYTES + 5 * DIRECT_ALIGN;
/** What the file holds before a test writes: every byte a writer must not touch keeps it. */
const BACKGROUND = 0xa5;

let dir: string;
let file = 0;

/** A file of FILE_BYTES filled with BACKGROUND, open read-write, and the model of its bytes. */
async function freshFile() {
  const name = path.join(dir, `f${file++}`);
  await fsp.writeFile(name, Buffer.alloc(FILE_BYTES, BACKGROUND));
  return { name, handle: await fsp.open(name, 'r+'), model: Buffer.alloc(FILE_BYTES, BACKGROUND) };
}

/** Whether this file system takes O_DIRECT at all (then the writer must use it). */
async function directPossible(name: string): Promise<boolean> {
  const h = await fsp.open(name, constants.O_WRONLY | constants.O_DIRECT).catch(() => null);
  await h?.close();
  return h !== null && sparseSupported;
}

describe('DirectWriter', () => {
  before(async () => {
    dir = await tempDir('diskport-direct-');
  });
  after(async () => {
    await fsp.rm(dir, { recursive: true, force: true });
  });

  for (const direct of [true, false]) {
    const mode = direct ? 'with O_DIRECT' : 'through the page cache';

    test(`${mode}: 300 seeded writes and zeroings, runs and jumps, land exactly as given`, async () => {
      const { name, handle, model } = await freshFile();
      const writer = await DirectWriter.open(name, handle, { direct });
      assert.equal(writer.isDirect, direct && (await directPossible(name)));
      const rnd = prng(direct ? 7 : 8);
      const pick = (n: number) => Math.floor(rnd() * n);
      let pos = pick(FILE_BYTES);
      try {
        for (let i = 0; i < 300; i++) {
          // Mostly runs that continue the last write, as a stream gives them; sometimes a jump.
          if (rnd() < 0.25)
            pos = rnd() < 0.5 ? pick(FILE_BYTES) : pick(FILE_BYTES / DIRECT_ALIGN) * DIRECT_ALIGN;
          const length = Math.min(
            FILE_BYTES - pos,
            rnd() < 0.1 ? pick(2 * DIRECT_BUFFER_BYTES) : pick(96 * 1024) + 1,
          );
          if (rnd() < 0.1) {
            // Zeros after a write, or over it while it may still be gathered.
            const at = rnd() < 0.5 ? pos : Math.max(0, pos - pick(64 * 1024));
            await writer.zero(at, length);
            model.fill(0, at, at + length);
          } else {
            const data = seededBytes(length, i);
            await writer.write(data, pos);
            // The writer copied it: the caller may reuse its buffer at once.
            data.copy(model, pos);
            data.fill(0xee);
          }
          pos = (pos + length) % FILE_BYTES;
        }
        await writer.flush();
        assert.ok((await fsp.readFile(name)).equals(model), 'the file is what was given, and nothing else');
      } finally {
        await writer.close();
        await handle.close();
      }
    });

    test(`${mode}: writes made without waiting land in the order made`, async () => {
      const { name, handle, model } = await freshFile();
      const writer = await DirectWriter.open(name, handle, { direct });
      const writes: Promise<void>[] = [];
      for (let i = 0; i < 40; i++) {
        // Overlapping pieces, each 100 KiB past the last start: the later one must win.
        const at = 512 + i * 100 * 1024;
        const data = seededBytes(300 * 1024, 100 + i);
        writes.push(writer.write(data, at));
        data.copy(model, at);
      }
      // Over the last piece, still gathered and not written: the zeros must come after it.
      const zeroAt = 512 + 39 * 100 * 1024 + 7;
      writes.push(writer.zero(zeroAt, 3 * DIRECT_ALIGN));
      model.fill(0, zeroAt, zeroAt + 3 * DIRECT_ALIGN);
      await Promise.all(writes);
      await writer.flush();
      assert.ok((await fsp.readFile(name)).equals(model));
      await writer.close();
      await handle.close();
    });
  }

  test('writes fly two at a time, and a rewrite of bytes still in flight lands after them', async () => {
    const { name, handle } = await freshFile();
    const writer = await DirectWriter.open(name, handle);
    // A slow disk for the first write: it is still in flight when the rest are made.
    const proto = DirectWriter.prototype as unknown as { writeOut: (...args: unknown[]) => Promise<void> };
    const realWriteOut = proto.writeOut;
    let calls = 0;
    let flying = 0;
    let most = 0;
    proto.writeOut = async function (this: unknown, ...args: unknown[]) {
      flying++;
      most = Math.max(most, flying);
      try {
        if (++calls === 1) await sleep(150);
        return await realWriteOut.apply(this, args);
      } finally {
        flying--;
      }
    };
    try {
      const first = seededBytes(DIRECT_BUFFER_BYTES, 301);
      const other = seededBytes(DIRECT_BUFFER_BYTES, 302);
      const again = seededBytes(DIRECT_BUFFER_BYTES, 303);
      await writer.write(first, 0);
      await writer.write(again, 0);
      await writer.write(other, 2 * DIRECT_BUFFER_BYTES);
      await writer.flush();
      assert.equal(most, 2, 'a second write started while the first was slow');
      const bytes = await fsp.readFile(name);
      assert.ok(
        bytes.subarray(0, DIRECT_BUFFER_BYTES).equals(again),
        'the rewrite landed after the slow write',
      );
      assert.ok(bytes.subarray(2 * DIRECT_BUFFER_BYTES, 3 * DIRECT_BUFFER_BYTES).equals(other));
    } finally {
      proto.writeOut = realWriteOut;
      await writer.close();
      await handle.close();
    }
  });

  test('discard() drops what was given but not yet written', async () => {
    const { name, handle, model } = await freshFile();
    const writer = await DirectWriter.open(name, handle);
    await writer.write(seededBytes(DIRECT_ALIGN + 100, 1), 3 * DIRECT_ALIGN + 10);
    await writer.discard();
    await writer.flush();
    assert.ok((await fsp.readFile(name)).equals(model), 'nothing reached the file');
    // The writer goes on as new.
    const data = seededBytes(2 * MiB, 2);
    await writer.write(data, MiB + 3);
    await writer.flush();
    data.copy(model, MiB + 3);
    assert.ok((await fsp.readFile(name)).equals(model));
    await writer.close();
    await handle.close();
  });

  test("a closed writer's buffers go to the next writer and carry none of its bytes", async () => {
    const first = await freshFile();
    const a = await DirectWriter.open(first.name, first.handle);
    await a.write(seededBytes(2 * DIRECT_BUFFER_BYTES, 5), 0);
    await a.flush();
    await a.close();
    await assert.rejects(a.write(Buffer.alloc(1), 0), /closed/);
    await first.handle.close();

    const second = await freshFile();
    const b = await DirectWriter.open(second.name, second.handle);
    const data = seededBytes(3 * DIRECT_ALIGN, 6);
    const at = DIRECT_BUFFER_BYTES + 100;
    await b.write(data, at);
    await b.flush();
    await b.close();
    await second.handle.close();
    data.copy(second.model, at);
    assert.ok((await fsp.readFile(second.name)).equals(second.model));
  });

  test('a failed direct write settles only when its edge writes have: zeroing after it wins', async () => {
    const { name, handle, model } = await freshFile();
    if (!(await directPossible(name))) return;
    // The caller's descriptor is slow (a busy disk) and the direct write fails (EIO): fault
    // injection on the real writer, as neither can be arranged on a test machine.
    const slow = {
      fd: handle.fd,
      write: (...args: Parameters<typeof handle.write>) => sleep(50).then(() => handle.write(...args)),
    } as unknown as typeof handle;
    const writer = await DirectWriter.open(name, slow);
    (writer as unknown as { writeDirect: () => Promise<void> }).writeDirect = () =>
      Promise.reject(Object.assign(new Error('EIO: i/o error, write'), { code: 'EIO' }));
    await writer.write(seededBytes(3 * DIRECT_ALIGN, 4), 100);
    await assert.rejects(writer.flush(), { code: 'EIO' });
    // What an abandoned streaming import does: drop what is gathered, then zero the range.
    await writer.discard();
    await handle.write(Buffer.alloc(4 * DIRECT_ALIGN), 0, 4 * DIRECT_ALIGN, 0);
    model.fill(0, 0, 4 * DIRECT_ALIGN);
    await sleep(150);
    await writer.close();
    assert.ok((await fsp.readFile(name)).equals(model), 'no byte of the failed write landed after the zeros');
    await handle.close();
  });

  test('a failed write is thrown by the next call, and discard() clears it', async () => {
    const { name, handle: rw, model } = await freshFile();
    await rw.close();
    // The caller's descriptor is read-only: the unaligned edges that go through it fail (EBADF).
    const handle = await fsp.open(name, 'r');
    const writer = await DirectWriter.open(name, handle);
    await writer.write(seededBytes(2 * DIRECT_ALIGN, 3), DIRECT_ALIGN / 2);
    await assert.rejects(writer.flush(), { code: 'EBADF' });
    await assert.rejects(writer.write(Buffer.alloc(1), 0), { code: 'EBADF' });
    await writer.discard();
    await writer.flush();
    await writer.close();
    await handle.close();
    // Only aligned whole blocks could have landed (with O_DIRECT); every other byte is untouched.
    const got = await fsp.readFile(name);
    assert.ok(got.subarray(0, DIRECT_ALIGN).equals(model.subarray(0, DIRECT_ALIGN)));
    assert.ok(got.subarray(2 * DIRECT_ALIGN).equals(model.subarray(2 * DIRECT_ALIGN)));
  });
});
