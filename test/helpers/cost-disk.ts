/**
 * The disk the commit-cost tests (delta-import-cost, imageio-write-cost)
 * change a little of: 8 GiB holding 128 MiB of data, as a qcow2 file qemu-io
 * wrote, and how they judge what a commit read and what a VDI holds.
 */
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { execFileP } from './api.js';
import { sample, scrape } from './metrics.js';
import { queryAt } from './pg.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
export const COST_DISK_SIZE = 8 * GiB;
/** The disk's data: 128 MiB in four places, 32 MiB of byte 0x11 * (i + 1) each. */
export const COST_DATA_AT = [0, 2 * GiB, 5 * GiB, 8 * GiB - 32 * MiB];

export async function qemuIo(file: string, commands: string[]): Promise<void> {
  await execFileP('qemu-io', ['-f', 'qcow2', ...commands.flatMap((c) => ['-c', c]), file]);
}

/** Writes the disk as `dir`/base.qcow2 and returns its path. */
export async function writeCostDisk(dir: string): Promise<string> {
  const file = path.join(dir, 'base.qcow2');
  await execFileP('qemu-img', ['create', '-f', 'qcow2', file, String(COST_DISK_SIZE)]);
  await qemuIo(
    file,
    COST_DATA_AT.map((at, i) => `write -P ${0x11 * (i + 1)} ${at} 32M`),
  );
  return file;
}

/** A qcow2 overlay of `base` at `file`, holding the writes of qemu-io's `commands`. */
export async function overlayOf(base: string, file: string, commands: string[]): Promise<string> {
  await execFileP('qemu-img', ['create', '-f', 'qcow2', '-b', base, '-F', 'qcow2', file]);
  await qemuIo(file, commands);
  return file;
}

/** Bytes of VDI contents the server at `base` has read to commit deltas over them (the metric). */
export async function baseBytesRead(base: string): Promise<number> {
  const n = sample(await scrape(base), 'diskport_delta_base_bytes_read_total');
  assert.ok(n !== undefined, 'the metric is reported');
  return n;
}

/** VDI `vdi`'s qcow2 export from the server at `base` reads as `file` (qemu-img compare); `work` holds the export meanwhile. */
export async function assertExportReads(
  base: string,
  work: string,
  vdi: string,
  file: string,
): Promise<void> {
  const out = path.join(work, `check-${vdi}.qcow2`);
  const res = await fetch(`${base}/v1/vdis/${vdi}/contents?format=qcow2`);
  assert.equal(res.status, 200);
  await fsp.writeFile(out, Buffer.from(await res.arrayBuffer()));
  await execFileP('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', file, out]);
  await fsp.rm(out);
}

/** The path of VDI `vdi`'s top file at rest, in the local SR of the server whose data directory is `dataDir`. */
export function topLayerFile(dataDir: string, vdi: string): string {
  const [row] = queryAt<{ file_name: string }>(dataDir, 'SELECT file_name FROM vdis WHERE id = ?', vdi);
  return path.join(dataDir, 'srs', 'local', row.file_name);
}

/**
 * Bytes this process read and wrote through system calls (files and sockets
 * alike: /proc/self/io's rchar and wchar) while `run` ran: what a commit that
 * read or copied the whole disk could not hide. The server under test must
 * run in this process (startServer).
 */
export async function ioDuring(run: () => Promise<void>): Promise<{ read: number; written: number }> {
  const io = async () => {
    const text = await fsp.readFile('/proc/self/io', 'utf8');
    const field = (name: string) => Number(new RegExp(`^${name}: (\\d+)$`, 'm').exec(text)?.[1]);
    return { read: field('rchar'), written: field('wchar') };
  };
  const before = await io();
  await run();
  const after = await io();
  return { read: after.read - before.read, written: after.written - before.written };
}

/** Allocated bytes of VDI `vdi`'s block digest file, in the local SR of the server whose data directory is `dataDir`. */
export async function digestFileAllocated(dataDir: string, vdi: string): Promise<number> {
  const [row] = queryAt<{ digest_file: string }>(dataDir, 'SELECT digest_file FROM vdis WHERE id = ?', vdi);
  return (await fsp.stat(path.join(dataDir, 'srs', 'local', row.digest_file))).blocks * 512;
}
