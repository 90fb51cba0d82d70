/**
 * Every image at rest is one diskport wrote: a qcow2 uploaded into a qcow2
 * VDI (a VHD into a VHD VDI) is rewritten by diskport's own serializer
 * unless it already is that serializer's output, so whatever it carried
 * beside the disk (internal snapshots, refcount and L1 oddities, autoclear
 * bits, a bogus l1_size, compressed clusters, a fixed VHD's layout) does not
 * reach the SR, and `qemu-img check` passes on the file at rest.
 *
 * qemu-img writes the images (compressed, with internal snapshots, v2, small
 * clusters, extended L2, odd refcount widths, zero clusters), and seeded
 * mutations add what qemu reads but `qemu-img check` refuses. Each goes
 * through every import path (one-shot PUT, a transfer session, tus). An
 * accepted image leaves a file at rest that `qemu-img check` passes, that is
 * byte for byte the VDI's own export, and that `qemu-img compare` finds equal
 * to the source wherever qemu reads the source. A compressed cluster that
 * does not inflate is refused (400 MALFORMED_IMAGE) and the VDI stays as it
 * was.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { promises as fsp, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { deflateRawSync } from 'node:zlib';
import { codecFor } from '../src/formats/index.js';
import type { FormatCodec } from '../src/formats/types.js';
import { api, createVdi, type TransferJson } from './helpers/api.js';
import { prng, seededBytes, startServer, type TestServer, tempDir } from './helpers/server.js';

const MiB = 1024 * 1024;
const DISK_BYTES = 2 * MiB;
const SEEDED_CASES = 6;
const OFFSET_MASK = 0x00fffffffffffe00n;
const COPIED = 1n << 63n;
const COMPRESSED = 1n << 62n;

type ErrorBody = { error: { code: string; message: string } };
type Task = { id: string; status: string; error: { code: string; message: string } | null };
type VdiJson = { id: string; generation: number };

function qemuImg(...args: string[]): string {
  return execFileSync('qemu-img', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

/** Does `qemu-img check` pass on `file`? (Its complaint, if not.) */
function qemuCheck(file: string, format: string): string | null {
  const r = spawnSync('qemu-img', ['check', '-f', format, file], { encoding: 'utf8' });
  return r.status === 0 ? null : `${r.stdout}${r.stderr}`;
}

/** Can qemu read the whole disk of `file`? */
function qemuReads(file: string, format: string): boolean {
  return (
    spawnSync('qemu-img', ['convert', '-f', format, '-O', 'raw', file, `${file}.judge.raw`]).status === 0
  );
}

/** The codec's own verdict on a file: is it what diskport's serializer writes? */
async function isOwnLayout(codec: FormatCodec, file: string): Promise<boolean> {
  const image = await codec.open(file);
  try {
    return (await codec.isOwnLayout?.(image, file)) ?? false;
  } finally {
    await image.close();
  }
}

/** A disk with random, low-entropy (compressible) and zero regions. */
function makeDisk(seed: number): Buffer {
  const disk = Buffer.alloc(DISK_BYTES);
  const rand = prng(seed);
  for (let c = 0; c < DISK_BYTES; c += 64 * 1024) {
    const r = rand();
    if (r < 0.3) continue;
    if (r < 0.55) seededBytes(64 * 1024, seed * 1000 + c / 65536).copy(disk, c);
    else for (let i = c; i < c + 64 * 1024; i += 128) disk.fill(97 + Math.floor(rand() * 4), i, i + 16);
  }
  return disk;
}

/** Where a qcow2 keeps its mapping and refcounts. */
function anatomy(img: Buffer) {
  const clusterSize = 2 ** img.readUInt32BE(20);
  const extended = img.readUInt32BE(4) === 3 && (img.readBigUInt64BE(72) & 16n) !== 0n;
  const l2EntryBytes = extended ? 16 : 8;
  const l1Offset = Number(img.readBigUInt64BE(40));
  const l1Size = img.readUInt32BE(36);
  const l1Entries: number[] = [];
  const l2Entries: number[] = [];
  for (let i = 0; i < l1Size; i++) {
    const pos = l1Offset + i * 8;
    const l2 = Number(img.readBigUInt64BE(pos) & OFFSET_MASK);
    if (l2 === 0) continue;
    l1Entries.push(pos);
    for (let j = 0; j < clusterSize / l2EntryBytes; j++) {
      if (img.readBigUInt64BE(l2 + j * l2EntryBytes) !== 0n) l2Entries.push(l2 + j * l2EntryBytes);
    }
  }
  const dataEntries = l2Entries.filter((p) => {
    const e = img.readBigUInt64BE(p);
    return !(e & COMPRESSED) && (e & OFFSET_MASK) !== 0n;
  });
  const compressedEntries = l2Entries.filter((p) => img.readBigUInt64BE(p) & COMPRESSED);
  const refcountOrder = img.readUInt32BE(4) === 3 ? img.readUInt32BE(96) : 4;
  return { clusterSize, l1Entries, dataEntries, compressedEntries, refcountOrder };
}

/** Host offset of a compressed cluster's data (64 KiB clusters: bits 0..53). */
function compressedHost(img: Buffer, entryPos: number): number {
  return Number(img.readBigUInt64BE(entryPos) & ((1n << 54n) - 1n));
}

type Mutation = (img: Buffer, rand: () => number) => void;

/** What qemu reads but `qemu-img check` refuses (or that is none of the disk's business). */
const ODDITIES: Record<string, Mutation> = {
  'autoclear bits': (img) => {
    if (img.readUInt32BE(4) === 3) img.writeBigUInt64BE(0xf0n, 88);
  },
  'l1_size past the disk': (img) => img.writeUInt32BE(img.readUInt32BE(36) + 3, 36),
  'a refcount off by one': (img, rand) => {
    const { clusterSize, refcountOrder } = anatomy(img);
    if (refcountOrder !== 4) return;
    const table = Number(img.readBigUInt64BE(48));
    const block = Number(img.readBigUInt64BE(table) & OFFSET_MASK);
    const used = Math.floor(img.length / clusterSize);
    const at = block + 2 * Math.floor(rand() * used);
    img.writeUInt16BE(img.readUInt16BE(at) + 1, at);
  },
  'COPIED flags cleared': (img) => {
    const { l1Entries, dataEntries } = anatomy(img);
    for (const p of [...l1Entries, ...dataEntries]) img.writeBigUInt64BE(img.readBigUInt64BE(p) & ~COPIED, p);
  },
  'reserved L2 bits': (img, rand) => {
    const { dataEntries } = anatomy(img);
    if (dataEntries.length === 0) return;
    const p = dataEntries[Math.floor(rand() * dataEntries.length)];
    const bit = rand() < 0.5 ? 1n + BigInt(Math.floor(rand() * 8)) : 56n + BigInt(Math.floor(rand() * 6));
    img.writeBigUInt64BE(img.readBigUInt64BE(p) | (1n << bit), p);
  },
  'the dirty bit': (img) => {
    if (img.readUInt32BE(4) === 3) img.writeBigUInt64BE(img.readBigUInt64BE(72) | 1n, 72);
  },
};

interface Case {
  name: string;
  file: string;
  /** Refused with this code, or accepted (null). */
  refusedWith: string | null;
}

describe('every image at rest is one diskport wrote', () => {
  let dir: string;
  let srv: TestServer;
  const cases: Case[] = [];
  const raw = (seed: number) => {
    const file = path.join(dir, `disk-${seed}.raw`);
    writeFileSync(file, makeDisk(seed));
    return file;
  };
  /** A qcow2 that qemu-img writes from a seeded disk, then `then` changes with qemu's own tools. */
  const qcow2 = (name: string, seed: number, options: string[], then: (file: string) => void = () => {}) => {
    const file = path.join(dir, `${name.replace(/\W+/g, '-')}.qcow2`);
    qemuImg('convert', '-f', 'raw', '-O', 'qcow2', ...options, raw(seed), file);
    then(file);
    return file;
  };
  const io = (file: string, ...commands: string[]) =>
    execFileSync('qemu-io', ['-f', 'qcow2', ...commands.flatMap((c) => ['-c', c]), file], { stdio: 'pipe' });

  before(async () => {
    dir = await tempDir('diskport-clean-');
    srv = await startServer({ dataDir: path.join(dir, 'data') });
    const bases: Record<string, string> = {
      plain: qcow2('plain', 1, []),
      compressed: qcow2('compressed', 2, ['-c']),
      'internal snapshots': qcow2('snapshots', 3, ['-c'], (f) => {
        qemuImg('snapshot', '-c', 'first', f);
        io(f, 'write -P 0x33 256k 320k', 'write -z 1M 128k');
        qemuImg('snapshot', '-c', 'second', f);
        io(f, 'write -P 0x44 1536k 64k');
      }),
      'version 2 with a snapshot': qcow2('v2', 4, ['-o', 'compat=0.10'], (f) => {
        qemuImg('snapshot', '-c', 'old', f);
        io(f, 'write -P 0x55 0 192k');
      }),
      'extended L2, 32 KiB clusters': qcow2(
        'extended',
        5,
        ['-c', '-o', 'extended_l2=on,cluster_size=32k'],
        (f) => io(f, 'write -P 0x66 70k 9k'),
      ),
      '512-byte clusters, 1-bit refcounts': qcow2('small', 6, ['-o', 'cluster_size=512,refcount_bits=1']),
      '64-bit refcounts, lazy': qcow2('lazy', 7, ['-o', 'refcount_bits=64,lazy_refcounts=on']),
      'preallocated metadata, zero clusters': qcow2('prealloc', 8, ['-o', 'preallocation=metadata'], (f) =>
        io(f, 'write -z 0 512k', 'write -z -u 1M 256k'),
      ),
    };
    for (const [name, file] of Object.entries(bases)) cases.push({ name, file, refusedWith: null });
    // Seeded: a base with one to three oddities that qemu reads and qemu-img check refuses.
    const baseNames = Object.keys(bases).filter((n) => !n.startsWith('512-byte'));
    const oddityNames = Object.keys(ODDITIES);
    for (let seed = 1; seed <= SEEDED_CASES; seed++) {
      const rand = prng(1700 + seed);
      const base = baseNames[Math.floor(rand() * baseNames.length)];
      const img = readFileSync(bases[base]);
      const applied = new Set<string>();
      for (let n = 1 + Math.floor(rand() * 3); n > 0; n--) {
        applied.add(oddityNames[Math.floor(rand() * oddityNames.length)]);
      }
      for (const oddity of applied) ODDITIES[oddity](img, rand);
      const file = path.join(dir, `seeded-${seed}.qcow2`);
      writeFileSync(file, img);
      cases.push({ name: `${base} + ${[...applied].join(' + ')}`, file, refusedWith: null });
    }
    // A bogus l1_size that qemu cannot even open with: diskport reads the entries the disk needs.
    const hugeL1 = readFileSync(bases.plain);
    hugeL1.writeUInt32BE(0x100000, 36);
    writeFileSync(path.join(dir, 'huge-l1.qcow2'), hugeL1);
    cases.push({
      name: 'an l1_size far past the file',
      file: path.join(dir, 'huge-l1.qcow2'),
      refusedWith: null,
    });
    // Compressed clusters that do not inflate to one cluster: refused, as qemu cannot read them either.
    const compressed = readFileSync(bases.compressed);
    const entries = anatomy(compressed).compressedEntries;
    assert.ok(entries.length > 4, 'the compressed base holds compressed clusters');
    const rand = prng(1717);
    const wrongLength = Buffer.from(compressed);
    deflateRawSync(Buffer.alloc(1000, 0x5a)).copy(
      wrongLength,
      compressedHost(compressed, entries[Math.floor(rand() * entries.length)]),
    );
    writeFileSync(path.join(dir, 'wrong-length.qcow2'), wrongLength);
    const garbage = Buffer.from(compressed);
    seededBytes(64, 1718).copy(
      garbage,
      compressedHost(compressed, entries[Math.floor(rand() * entries.length)]),
    );
    writeFileSync(path.join(dir, 'garbage.qcow2'), garbage);
    for (const name of ['wrong-length', 'garbage']) {
      const file = path.join(dir, `${name}.qcow2`);
      assert.equal(qemuReads(file, 'qcow2'), false, `qemu reads ${name}.qcow2`);
      cases.push({ name: `a compressed cluster: ${name}`, file, refusedWith: 'MALFORMED_IMAGE' });
    }
  });
  after(async () => {
    await srv?.close();
    await fsp.rm(dir, { recursive: true, force: true });
  });

  const waitTask = async (id: string): Promise<Task> => {
    for (let i = 0; ; i++) {
      const res = await api<Task>(srv.url, 'GET', `/v1/tasks/${id}?wait=5`);
      if (!['pending', 'running'].includes(res.body.status)) return res.body;
      assert.ok(i < 12, `task still running after a minute: ${JSON.stringify(res.body)}`);
    }
  };

  /** Each import path: resolves with the import's outcome, null when it succeeded. */
  const paths: Record<
    string,
    (vdi: string, format: string, body: Buffer) => Promise<ErrorBody['error'] | null>
  > = {
    'one-shot PUT': async (vdi, format, body) => {
      const res = await fetch(`${srv.url}/v1/vdis/${vdi}/contents?format=${format}`, {
        method: 'PUT',
        body: new Uint8Array(body),
      });
      return res.status === 200 ? null : ((await res.json()) as ErrorBody).error;
    },
    'transfer session': async (vdi, format, body) => {
      const t = await api<TransferJson>(srv.url, 'POST', '/v1/transfers', {
        vdi,
        direction: 'upload',
        format,
        size: body.length,
      });
      assert.equal(t.status, 201, JSON.stringify(t.body));
      const put = await fetch(t.body.url, { method: 'PUT', body: new Uint8Array(body) });
      assert.ok(put.ok, `session PUT: ${put.status}`);
      await api(srv.url, 'POST', `/v1/transfers/${t.body.id}/finalize?token=${t.body.token}`);
      const task = await waitTask(t.body.task_id);
      return task.status === 'success' ? null : (task.error as ErrorBody['error']);
    },
    tus: async (vdi, format, body) => {
      const b64 = (s: string) => Buffer.from(s).toString('base64');
      const created = await fetch(`${srv.url}/v1/tus/`, {
        method: 'POST',
        headers: {
          'tus-resumable': '1.0.0',
          'upload-length': String(body.length),
          'upload-metadata': `vdi ${b64(vdi)},format ${b64(format)}`,
        },
      });
      assert.equal(created.status, 201, await created.text());
      const res = await fetch(new URL(created.headers.get('location') as string, srv.url), {
        method: 'PATCH',
        headers: {
          'tus-resumable': '1.0.0',
          'upload-offset': '0',
          'content-type': 'application/offset+octet-stream',
        },
        body: new Uint8Array(body),
      });
      return res.status === 204 ? null : ((await res.json()) as ErrorBody).error;
    },
  };

  /** The VDI's file at rest, as the store names it. */
  const fileAtRest = (vdi: string) => srv.services.vdis.imagePath(srv.services.vdis.get(vdi));
  const exportOf = async (vdi: string, format: string) => {
    const res = await fetch(`${srv.url}/v1/vdis/${vdi}/contents?format=${format}`);
    assert.equal(res.status, 200);
    return Buffer.from(await res.arrayBuffer());
  };

  /** Imports `file` into a VDI of `format` holding other content first; checks what is at rest after. */
  const importAndJudge = async (c: Case, format: 'qcow2' | 'vhd', via: string, size: number) => {
    const what = `${c.name} via ${via}`;
    const vdi = await createVdi(srv.url, size, { image_format: format });
    const earlier = seededBytes(size, 99);
    assert.equal(await paths['one-shot PUT'](vdi.id, 'raw', earlier), null);
    const before = await api<VdiJson>(srv.url, 'GET', `/v1/vdis/${vdi.id}`);
    const failure = await paths[via](vdi.id, format, readFileSync(c.file));
    const afterwards = await api<VdiJson>(srv.url, 'GET', `/v1/vdis/${vdi.id}`);
    if (c.refusedWith) {
      assert.equal(failure?.code, c.refusedWith, `${what}: ${JSON.stringify(failure)}`);
      assert.equal(afterwards.body.generation, before.body.generation, `${what}: the VDI changed`);
      assert.ok((await exportOf(vdi.id, 'raw')).equals(earlier), `${what}: the VDI's bytes changed`);
      return;
    }
    assert.equal(failure, null, `${what}: ${JSON.stringify(failure)}`);
    assert.ok(afterwards.body.generation > before.body.generation, what);
    const atRest = fileAtRest(vdi.id);
    if (format === 'qcow2') assert.equal(qemuCheck(atRest, 'qcow2'), null, `${what}: qemu-img check at rest`);
    else qemuImg('info', '-f', 'vpc', atRest);
    assert.ok(
      readFileSync(atRest).equals(await exportOf(vdi.id, format)),
      `${what}: the file at rest is not what diskport writes`,
    );
    const qemuFormat = format === 'vhd' ? 'vpc' : 'qcow2';
    if (qemuReads(c.file, qemuFormat)) {
      qemuImg('compare', '-f', qemuFormat, '-F', qemuFormat, c.file, atRest);
    }
    // Only diskport's own image would have been kept as uploaded.
    const codec = codecFor(format);
    assert.equal(await isOwnLayout(codec, atRest), true, `${what}: at rest, not diskport's own layout`);
    assert.equal(await isOwnLayout(codec, c.file), false, `${what}: the source is taken for diskport's own`);
  };

  for (const via of ['one-shot PUT', 'transfer session', 'tus']) {
    test(`qcow2 into a qcow2 VDI via ${via}: accepted images pass qemu-img check at rest, damaged ones are refused`, async () => {
      assert.ok(cases.length >= 16);
      // The oddities are real: qemu-img check refuses most of the seeded sources.
      const seeded = cases.filter((c) => c.name.includes(' + '));
      const refused = seeded.filter((c) => qemuCheck(c.file, 'qcow2') !== null);
      assert.ok(
        refused.length * 2 >= seeded.length,
        `qemu-img check passes ${seeded.length - refused.length} seeded`,
      );
      for (const c of cases) await importAndJudge(c, 'qcow2', via, DISK_BYTES);
    });
  }

  test('VHDs into VHD VDIs through every path: fixed, dynamic and odd footers are rewritten, diskport exports kept', async () => {
    const disk = raw(30);
    const vhd = (name: string, options: string[], then: (img: Buffer) => void = () => {}) => {
      const file = path.join(dir, `${name}.vhd`);
      qemuImg('convert', '-f', 'raw', '-O', 'vpc', ...options, disk, file);
      const img = readFileSync(file);
      then(img);
      writeFileSync(file, img);
      return { name, file, refusedWith: null };
    };
    const vhdCases: Case[] = [
      vhd('dynamic, CHS-sized', []),
      vhd('dynamic, current size', ['-o', 'force_size=on']),
      vhd('fixed', ['-o', 'subformat=fixed,force_size=on']),
      // Footers that disagree: qemu reads the copy at 0, diskport the footer at the end.
      vhd('dynamic, footer copy of another time', ['-o', 'force_size=on'], (img) => {
        img.writeUInt32BE(img.readUInt32BE(24) + 1, 24);
        img.writeUInt32BE(0, 64);
        let sum = 0;
        for (let i = 0; i < 512; i++) sum += img[i];
        img.writeUInt32BE(~sum >>> 0, 64);
      }),
      // The copy at 0 gone: qemu cannot open it, diskport reads the footer at the end.
      vhd('dynamic, no footer copy', ['-o', 'force_size=on'], (img) => img.fill(0, 0, 512)),
    ];
    for (const via of Object.keys(paths)) {
      for (const c of vhdCases) {
        const size = (JSON.parse(qemuImg('info', '--output=json', c.file)) as { 'virtual-size': number })[
          'virtual-size'
        ];
        await importAndJudge(c, 'vhd', via, size);
      }
    }
  });
});
