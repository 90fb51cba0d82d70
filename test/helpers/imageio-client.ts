/**
 * An ovirt-imageio client written from ovirt-imageio's docs/images.md alone
 * (not from diskport's code): what its client library does against a
 * transfer URL. OPTIONS first; uploads send data extents with PUT
 * `Content-Range: bytes s-e/*` and `?flush=n` from several writers, holes
 * with PATCH zero, then one PATCH flush; downloads ask for the zero extents
 * and GET the data extents only. blkhash is computed here too, from its
 * definition, by python3's hashlib (an implementation that is not diskport's).
 */
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import { execFileP } from './api.js';

const MiB = 1024 * 1024;
/** The largest request body; bigger extents are cut. */
const MAX_REQUEST_BYTES = 8 * MiB;

export interface ImageioOptions {
  allow: string[];
  features: string[];
  max_readers?: number;
  max_writers?: number;
  unix_socket?: string;
  transfer_format?: string;
  virtual_size?: number;
}

export interface ClientExtent {
  start: number;
  length: number;
  zero: boolean;
  hole?: boolean;
}

export async function options(url: string): Promise<ImageioOptions> {
  const res = await fetch(url, { method: 'OPTIONS' });
  assert.equal(res.status, 200, await res.clone().text());
  const body = (await res.json()) as Omit<ImageioOptions, 'allow'>;
  return { ...body, allow: (res.headers.get('allow') ?? '').split(',').map((m) => m.trim()) };
}

/** The source's extents, as `qemu-img map` sees them (what the imageio client asks qemu-nbd for). */
export async function localExtents(file: string, format: string): Promise<ClientExtent[]> {
  const { stdout } = await execFileP('qemu-img', ['map', '--output=json', '-f', format, file]);
  const out: ClientExtent[] = [];
  for (const e of JSON.parse(stdout) as { start: number; length: number; data: boolean; zero: boolean }[]) {
    const zero = e.zero || !e.data;
    const last = out.at(-1);
    if (last && last.zero === zero) last.length += e.length;
    else out.push({ start: e.start, length: e.length, zero });
  }
  return out;
}

async function check(res: Response, what: string): Promise<void> {
  if (res.status !== 200) assert.fail(`${what}: ${res.status} ${await res.text()}`);
  await res.arrayBuffer();
}

/**
 * Uploads the raw file `file` whose extents are `extents`: data in
 * `writers` parallel PUTs with flush=n, zero extents with PATCH zero, then
 * a single PATCH flush.
 */
export async function upload(url: string, file: string, extents: ClientExtent[], writers = 4): Promise<void> {
  const work: (
    | { kind: 'data'; start: number; length: number }
    | { kind: 'zero'; start: number; length: number }
  )[] = [];
  for (const e of extents) {
    if (e.zero) {
      work.push({ kind: 'zero', start: e.start, length: e.length });
      continue;
    }
    for (let at = e.start; at < e.start + e.length; at += MAX_REQUEST_BYTES) {
      work.push({ kind: 'data', start: at, length: Math.min(MAX_REQUEST_BYTES, e.start + e.length - at) });
    }
  }
  const fd = await fsp.open(file, 'r');
  try {
    let next = 0;
    const writer = async () => {
      while (next < work.length) {
        const w = work[next++];
        if (w.kind === 'zero') {
          const res = await fetch(url, {
            method: 'PATCH',
            headers: { 'content-type': 'application/json' },
            body: JSON.stringify({ op: 'zero', offset: w.start, size: w.length, flush: false }),
          });
          await check(res, `PATCH zero ${w.start}+${w.length}`);
        } else {
          const buf = Buffer.alloc(w.length);
          await fd.read(buf, 0, w.length, w.start);
          const res = await fetch(`${url}?flush=n`, {
            method: 'PUT',
            headers: { 'content-range': `bytes ${w.start}-${w.start + w.length - 1}/*` },
            body: buf,
          });
          await check(res, `PUT ${w.start}+${w.length}`);
        }
      }
    };
    await Promise.all(Array.from({ length: writers }, writer));
  } finally {
    await fd.close();
  }
  const res = await fetch(url, { method: 'PATCH', body: JSON.stringify({ op: 'flush' }) });
  await check(res, 'PATCH flush');
}

export async function extents(url: string, context = 'zero'): Promise<ClientExtent[]> {
  const res = await fetch(`${url}/extents?context=${context}`);
  assert.equal(res.status, 200, await res.clone().text());
  return (await res.json()) as ClientExtent[];
}

/** Downloads into a sparse local file: the size from the extents, data extents only, one Range each. */
export async function download(url: string, file: string): Promise<ClientExtent[]> {
  const ext = await extents(url);
  const size = ext.reduce((n, e) => n + e.length, 0);
  const fd = await fsp.open(file, 'w');
  try {
    await fd.truncate(size);
    for (const e of ext.filter((x) => !x.zero)) {
      for (let at = e.start; at < e.start + e.length; at += MAX_REQUEST_BYTES) {
        const end = Math.min(e.start + e.length, at + MAX_REQUEST_BYTES) - 1;
        const res = await fetch(url, { headers: { range: `bytes=${at}-${end}` } });
        assert.equal(res.status, 206, `GET bytes ${at}-${end}: ${res.status}`);
        assert.equal(res.headers.get('content-range'), `bytes ${at}-${end}/*`);
        const body = Buffer.from(await res.arrayBuffer());
        assert.equal(body.length, end - at + 1);
        await fd.write(body, 0, body.length, at);
      }
    }
  } finally {
    await fd.close();
  }
  return ext;
}

export async function checksum(
  url: string,
  query = '',
): Promise<{ algorithm: string; block_size: number; checksum: string }> {
  const res = await fetch(`${url}/checksum${query}`);
  assert.equal(res.status, 200, await res.clone().text());
  return (await res.json()) as { algorithm: string; block_size: number; checksum: string };
}

const BLKHASH_PY = `
import hashlib, sys
path, algorithm, block_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
def new(data=b""):
    if algorithm.startswith("blake2"):
        return getattr(hashlib, algorithm)(data, digest_size=32)
    return hashlib.new(algorithm, data)
outer = new()
with open(path, "rb") as f:
    while True:
        block = f.read(block_size)
        if not block:
            break
        outer.update(new(block).digest())
print(outer.hexdigest())
`;

/** blkhash of a local file by its definition: each block hashed, the hash of the block digests. */
export async function localBlkhash(
  file: string,
  algorithm = 'blake2b',
  blockSize = 4 * MiB,
): Promise<string> {
  const { stdout } = await execFileP('python3', ['-c', BLKHASH_PY, file, algorithm, String(blockSize)]);
  return stdout.trim();
}
