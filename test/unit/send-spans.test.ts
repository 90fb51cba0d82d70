/**
 * The spans a vhd or qcow2 export is sent from (src/formats/send-spans.ts),
 * and the native send that takes them (native/sendfile.c): the spans of a
 * layout concatenate to its stream, in batches that stay bounded; the addon
 * sends file, zero and buffer spans in order over a real socket, and refuses
 * spans it cannot vouch for before it starts.
 */
import assert from 'node:assert/strict';
import { promises as fsp, read } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import { codecFor } from '../../src/formats/index.js';
import { batchLimits } from '../../src/formats/send-spans.js';
import type { SendSpan, SerializedImage } from '../../src/formats/types.js';
import { MaskedImage } from '../../src/image/masked-image.js';
import { addon } from '../../src/image/native.js';
import { RawFileImage } from '../../src/image/raw-file-image.js';
import { seededBytes } from '../helpers/server.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 24 * MiB + 512;
const readP = promisify(read);

/** The bytes the spans stand for, read from the files they name. */
async function bytesOf(batches: Iterable<readonly SendSpan[]>): Promise<Buffer> {
  const parts: Buffer[] = [];
  for (const batch of batches) {
    for (const s of batch) {
      if ('bytes' in s) parts.push(Buffer.from(s.bytes));
      else if (s.fd < 0) parts.push(Buffer.alloc(s.length));
      else {
        const buf = Buffer.alloc(s.length);
        // Past the file's end: zeros, as the native send does.
        for (let done = 0, n = -1; done < s.length && n !== 0; done += n) {
          n = (await readP(s.fd, buf, done, s.length - done, s.position + done)).bytesRead;
        }
        parts.push(buf);
      }
    }
  }
  return Buffer.concat(parts);
}

async function streamOf(serialized: SerializedImage, start: number, end: number): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const chunk of serialized.read(start, end)) parts.push(Buffer.from(chunk));
  return Buffer.concat(parts);
}

describe('export spans', () => {
  let dir: string;
  let image: RawFileImage;
  before(async () => {
    dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'diskport-spans-'));
    const file = path.join(dir, 'disk.img');
    const disk = Buffer.alloc(SIZE);
    seededBytes(3 * MiB + 100, 1).copy(disk, 0);
    seededBytes(64 * KiB, 2).copy(disk, 9 * MiB + 4 * KiB);
    seededBytes(SIZE - 20 * MiB, 3).copy(disk, 20 * MiB);
    // Sparse: the holes are holes of the file too.
    const handle = await fsp.open(file, 'w');
    for (const [at, n] of [
      [0, 3 * MiB + 100],
      [9 * MiB + 4 * KiB, 64 * KiB],
      [20 * MiB, SIZE - 20 * MiB],
    ])
      await handle.write(disk, at, n, at);
    await handle.close();
    image = await RawFileImage.open(file);
  });
  after(async () => {
    await image.close();
    await fsp.rm(dir, { recursive: true, force: true });
  });

  for (const format of ['vhd', 'qcow2'] as const) {
    test(`${format}: the spans of any range are the stream's bytes, whole, delta and in small batches`, async () => {
      const images = [image, new MaskedImage(image, [{ start: 2 * MiB, length: 8 * MiB }])];
      for (const img of images) {
        const opts = img === image ? {} : { parent: { fileName: 'base.x', uuid: Buffer.alloc(16, 1) } };
        const serialized = await codecFor(format).serialize(img, opts);
        assert.ok(serialized.spans, 'an image in files has spans');
        const size = serialized.size;
        for (const [start, end] of [
          [0, size],
          [1, 3 * MiB],
          [size - 2 * MiB - 7, size],
          [Math.floor(size / 2), Math.floor(size / 2) + 1],
        ]) {
          const expected = await streamOf(serialized, start, end);
          assert.ok((await bytesOf(serialized.spans(start, end))).equals(expected), `${start}-${end}`);
        }
      }
    });
  }

  test('batches end at the span limit and at the made-bytes limit, and the next picks up where one ended', async () => {
    const saved = { ...batchLimits };
    try {
      batchLimits.spans = 5;
      const vhd = await codecFor('vhd').serialize(image);
      const batches = [...vhd.spans!(0, vhd.size)];
      assert.ok(batches.length > 3);
      // A batch ends once it has reached the limit: the piece that reached it comes whole (a block's data and holes).
      for (const b of batches) assert.ok(b.length <= 5 + 3, `${b.length} spans in a batch`);
      assert.ok((await bytesOf(batches)).equals(await streamOf(vhd, 0, vhd.size)));
      batchLimits.spans = 8192;
      batchLimits.madeBytes = 64 * KiB;
      const qcow2 = await codecFor('qcow2').serialize(image);
      const qBatches = [...qcow2.spans!(0, qcow2.size)];
      for (const b of qBatches) {
        const made = b.reduce((n, s) => n + ('bytes' in s ? s.bytes.length : 0), 0);
        // One piece may cross the limit: a batch ends after it.
        assert.ok(made <= 2 * 64 * KiB, `${made} made bytes in a batch`);
      }
      assert.ok(qBatches.length >= 5, `${qBatches.length} batches`);
      assert.ok((await bytesOf(qBatches)).equals(await streamOf(qcow2, 0, qcow2.size)));
    } finally {
      Object.assign(batchLimits, saved);
    }
  });

  test('holes in data blocks are zero spans, never read from the file', async () => {
    const vhd = await codecFor('vhd').serialize(image);
    const spans = [...vhd.spans!(0, vhd.size)].flat();
    const zeros = spans.filter((s) => !('bytes' in s) && s.fd < 0);
    // The block holding 9 MiB + 4 KiB: all but its 64 KiB of data is a hole.
    assert.ok(
      zeros.some((s) => !('bytes' in s) && s.length === 2 * MiB - 64 * KiB - 4 * KiB - (9 * MiB - 8 * MiB)),
    );
    assert.ok(spans.every((s) => !('bytes' in s) || s.bytes.length > 0));
  });
});

/** A loopback connection: the server side's descriptor, and everything the client receives. */
async function connection(): Promise<{ fd: number; received: Promise<Buffer>; close: () => void }> {
  const server = net.createServer();
  server.listen(0, '127.0.0.1');
  await new Promise((r) => server.once('listening', r));
  const { port } = server.address() as net.AddressInfo;
  const client = net.connect(port, '127.0.0.1');
  const [socket] = (await new Promise((r) => server.once('connection', (s) => r([s])))) as [net.Socket];
  server.close();
  const chunks: Buffer[] = [];
  client.on('data', (c) => chunks.push(c));
  const received = new Promise<Buffer>((r) => client.on('end', () => r(Buffer.concat(chunks))));
  const fd = (socket as unknown as { _handle: { fd: number } })._handle.fd;
  return {
    fd,
    received,
    close: () => {
      socket.end();
      client.end();
    },
  };
}

describe('native sendSpans with buffer spans', () => {
  const native = addon!;
  const noop = () => {};

  test('sends file, zero and buffer spans in order, slices of one buffer passed once', async () => {
    assert.equal(typeof native?.sendSpans, 'function', 'the native addon is older than native/sendfile.c');
    const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'diskport-sendspans-'));
    const file = path.join(dir, 'f');
    const data = seededBytes(3 * MiB, 9);
    await fsp.writeFile(file, data);
    const handle = await fsp.open(file, 'r');
    const head = Buffer.from('HEADER-');
    const bitmap = Buffer.alloc(512, 0xff);
    const big = seededBytes(9 * MiB, 10); // more than one step of the native send
    const conn = await connection();
    const code = await new Promise<string | null>((resolve) =>
      native.sendSpans(
        conn.fd,
        [handle.fd],
        // head, bitmap, 1 MiB of the file, zeros, bitmap again, past the file's end (zeros), the big buffer's middle
        new Float64Array([
          -2,
          0,
          head.length,
          -3,
          0,
          512,
          0,
          5,
          MiB,
          -1,
          0,
          1000,
          -3,
          0,
          512,
          0,
          3 * MiB - 10,
          20,
          -4,
          7,
          9 * MiB - 8,
        ]),
        noop,
        (c) => resolve(c),
        // An ArrayBuffer, and Buffers (typed arrays) whose spans count from their own first byte.
        [head.buffer.slice(head.byteOffset, head.byteOffset + head.length) as ArrayBuffer, bitmap, big],
      ),
    );
    conn.close();
    await handle.close();
    await fsp.rm(dir, { recursive: true, force: true });
    assert.equal(code, null);
    const expected = Buffer.concat([
      head,
      bitmap,
      data.subarray(5, 5 + MiB),
      Buffer.alloc(1000),
      bitmap,
      data.subarray(3 * MiB - 10),
      Buffer.alloc(10),
      big.subarray(7, 9 * MiB - 1),
    ]);
    assert.ok((await conn.received).equals(expected));
  });

  test('refuses spans past their buffer, unknown buffers and buffers that are not bytes, before sending', async () => {
    const conn = await connection();
    const buf = Buffer.alloc(100);
    const cases: [number[], unknown[], RegExp][] = [
      [[-2, 50, 51], [buf], /reaches past its buffer/],
      [[-3, 0, 1], [buf], /invalid span/],
      [[-2, 0, 1], [], /invalid span/],
      [[-2, 0, 1], ['not bytes'], /ArrayBuffers or typed arrays/],
      [[-2, 0.5, 1], [buf], /invalid span/],
    ];
    for (const [spans, buffers, message] of cases) {
      assert.throws(
        () => native.sendSpans(conn.fd, [], new Float64Array(spans), noop, noop, buffers as ArrayBuffer[]),
        message,
        JSON.stringify(spans),
      );
    }
    assert.throws(
      () => native.sendSpans(conn.fd, [], [0, 0, 1], noop, noop, 'x' as never),
      /buffers must be an array/,
    );
    conn.close();
    assert.equal((await conn.received).length, 0, 'nothing was sent');
  });
});
