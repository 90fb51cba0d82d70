/**
 * Ranged reads served from the export layout the image cache keeps
 * (src/http/lean-read.ts), once a first read has opened the image: every
 * range of the raw, vhd and qcow2 exports equals the same bytes of the whole
 * export (the stream path), edges of the layouts included (the vhd's BAT,
 * bitmaps and footer, the qcow2's tables and its padded last cluster), and a
 * write between two reads changes the ETag and the bytes.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { seededBytes, startServer, type TestServer } from './helpers/server.js';

/** Not a whole number of 2 MiB VHD blocks nor of 64 KiB qcow2 clusters: both pad their last one. */
const SIZE = 5 * 1024 * 1024 + 4096;
const MiB = 1024 * 1024;

/** Data with holes: [1 MiB, 2.5 MiB) and the last 4 KiB read as zeros. */
function content(seed: number): Buffer {
  const buf = seededBytes(SIZE, seed);
  buf.fill(0, MiB, MiB * 2.5);
  buf.fill(0, SIZE - 4096);
  return buf;
}

describe('lean ranged reads equal the stream path', () => {
  let srv: TestServer;
  let id: string;
  const whole = new Map<string, Buffer>();

  const contentsUrl = (format: string) => `${srv.url}/v1/vdis/${id}/contents?format=${format}`;
  const put = async (seed: number) => {
    const res = await fetch(contentsUrl('raw'), { method: 'PUT', body: new Uint8Array(content(seed)) });
    assert.equal(res.status, 200);
  };
  const ranged = async (format: string, range: string, headers: Record<string, string> = {}) => {
    const res = await fetch(contentsUrl(format), { headers: { Range: range, ...headers } });
    return { res, body: Buffer.from(await res.arrayBuffer()) };
  };
  const loadWhole = async () => {
    for (const format of ['raw', 'vhd', 'qcow2']) {
      const res = await fetch(contentsUrl(format));
      assert.equal(res.status, 200);
      whole.set(format, Buffer.from(await res.arrayBuffer()));
    }
  };

  before(async () => {
    srv = await startServer();
    const created = await fetch(`${srv.url}/v1/vdis`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ name_label: 'lean-ranges', virtual_size: SIZE }),
    });
    assert.equal(created.status, 201);
    id = ((await created.json()) as { id: string }).id;
    await put(7);
    await loadWhole();
  });
  after(() => srv.close());

  for (const format of ['raw', 'vhd', 'qcow2']) {
    test(`${format}: ranges across the layout equal the whole export's bytes`, async () => {
      const all = whole.get(format)!;
      const size = all.length;
      // vhd: footer copy 512, header 1024, BAT from 1536 (3 entries, one sector), blocks from 2048 with 512-byte bitmaps.
      const edges = [
        0,
        511,
        512,
        1535,
        1536,
        2047,
        2048,
        2559,
        2560,
        65535,
        65536,
        131071,
        131072,
        MiB,
        2 * MiB,
      ];
      edges.push(2048 + 512 + 2 * MiB, size - 4096, size - 513, size - 512, size - 1);
      const specs: string[] = ['bytes=0-0', `bytes=-${size + 10}`, 'bytes=-512', `bytes=${size - 70000}-`];
      for (const e of edges) if (e < size) specs.push(`bytes=${e}-${Math.min(size - 1, e + 65535)}`);
      for (const e of edges) if (e > 10 && e < size) specs.push(`bytes=${e - 10}-${e + 9}`);
      let seed = 1;
      for (let i = 0; i < 20; i++) {
        seed = (seed * 1103515245 + 12345) % 2 ** 31;
        const start = seed % size;
        specs.push(`bytes=${start}-${start + (seed % (MiB - 1))}`);
      }
      await ranged(format, 'bytes=0-0'); // opens the image and lays out the export
      for (const spec of specs) {
        const { res, body } = await ranged(format, spec);
        assert.equal(res.status, 206, spec);
        const [, from, to] = /^bytes (\d+)-(\d+)\/(\d+)$/.exec(res.headers.get('content-range') ?? '') ?? [];
        assert.ok(from !== undefined, `${spec}: ${res.headers.get('content-range')}`);
        assert.equal(res.headers.get('content-range'), `bytes ${from}-${to}/${size}`);
        assert.equal(Number(res.headers.get('content-length')), body.length, spec);
        assert.ok(body.equals(all.subarray(Number(from), Number(to) + 1)), `${format} ${spec}`);
      }
    });
  }

  test('HEAD, If-Range and a range of a MiB or more answer as before', async () => {
    await ranged('vhd', 'bytes=0-0');
    const head = await fetch(contentsUrl('vhd'), { method: 'HEAD' });
    assert.equal(head.status, 200);
    assert.equal(Number(head.headers.get('content-length')), whole.get('vhd')!.length);
    assert.equal(head.headers.get('accept-ranges'), 'bytes');
    const etag = head.headers.get('etag')!;
    const headRange = await fetch(contentsUrl('vhd'), { method: 'HEAD', headers: { Range: 'bytes=10-19' } });
    assert.equal(headRange.status, 206);
    assert.equal(headRange.headers.get('content-range'), `bytes 10-19/${whole.get('vhd')!.length}`);
    const held = await ranged('vhd', 'bytes=100-199', { 'If-Range': etag });
    assert.equal(held.res.status, 206);
    assert.ok(held.body.equals(whole.get('vhd')!.subarray(100, 200)));
    const stale = await ranged('vhd', 'bytes=100-199', { 'If-Range': '"stale"' });
    assert.equal(stale.res.status, 200);
    assert.ok(stale.body.equals(whole.get('vhd')!));
    const big = await ranged('qcow2', `bytes=0-${MiB}`);
    assert.equal(big.res.status, 206);
    assert.ok(big.body.equals(whole.get('qcow2')!.subarray(0, MiB + 1)));
    const past = await ranged('raw', `bytes=${SIZE}-`);
    assert.equal(past.res.status, 416);
  });

  test('a write between two ranged reads changes the ETag and the bytes', async () => {
    const before = new Map<string, string>();
    for (const format of ['raw', 'vhd', 'qcow2']) {
      await ranged(format, 'bytes=0-0');
      const { res } = await ranged(format, 'bytes=0-0');
      before.set(format, res.headers.get('etag')!);
    }
    await put(8);
    const old = new Map(whole);
    await loadWhole();
    for (const format of ['raw', 'vhd', 'qcow2']) {
      const all = whole.get(format)!;
      // Twice: the first read after the write opens the new generation, the second is served from it.
      for (let i = 0; i < 2; i++) {
        const { res, body } = await ranged(format, `bytes=${3 * MiB + 8192}-${3 * MiB + 8192 + 65535}`);
        assert.equal(res.status, 206);
        assert.notEqual(res.headers.get('etag'), before.get(format));
        assert.ok(body.equals(all.subarray(3 * MiB + 8192, 3 * MiB + 8192 + 65536)), format);
        assert.ok(!body.equals(old.get(format)!.subarray(3 * MiB + 8192, 3 * MiB + 8192 + 65536)), format);
      }
    }
  });
});
