/**
 * Set migration to a second diskport process: a receive token from the
 * destination, a map sending each disk to its own SR and format (one blank),
 * validation that refuses a bad map whole, writes during the migration
 * carried by its rounds, and a cancel or a killed destination leaving
 * nothing there and the source as it was.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { parseConfig } from '../src/config.js';
import { api, createVdi, curl, execFileP } from './helpers/api.js';
import { entryArgs } from './helpers/entry.js';
import {
  ROOT,
  type ServerProcess,
  spawnServer,
  startServer,
  type TestServer,
  tempDir,
} from './helpers/server.js';
import { waitFor } from './helpers/wait.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

type Task = {
  id: string;
  type: string;
  status: string;
  progress: number;
  bytes_done: number;
  bytes_total: number | null;
  error: { code: string; message: string } | null;
  result: {
    disks: {
      vdi: string;
      mode: string;
      task: string | null;
      dest_vdi: string | null;
      sr: string;
      image_format: string;
    }[];
    final_snapshots?: { vdi: string; snapshot: string }[];
    rounds?: number;
  } | null;
};
type ErrorBody = {
  error: {
    code: string;
    message: string;
    details?: { problems?: { vdi: string | null; message: string }[] };
  };
};

async function checksum(base: string, vdi: string): Promise<string> {
  const res = await api<{ checksum: string }>(base, 'GET', `/v1/vdis/${vdi}/checksum?async=false`);
  assert.equal(res.status, 200, JSON.stringify(res.body));
  return res.body.checksum;
}

async function receiveToken(dest: string, body: Record<string, unknown> = {}): Promise<string> {
  const res = await api<{ token: string }>(dest, 'POST', '/v1/migrations/receive', body);
  assert.equal(res.status, 201, JSON.stringify(res.body));
  return res.body.token;
}

async function fill(base: string, vdi: string, file: string, format = 'raw'): Promise<void> {
  await curl(['-T', file, `${base}/v1/vdis/${vdi}/contents?format=${format}`]);
}

async function randomFile(dir: string, name: string, bytes: number): Promise<string> {
  const file = path.join(dir, name);
  await execFileP('sh', ['-c', `head -c ${bytes} /dev/urandom > '${file}'`]);
  return file;
}

async function vdiIds(base: string, query = ''): Promise<string[]> {
  return (await api<{ id: string }[]>(base, 'GET', `/v1/vdis${query}`)).body.map((v) => v.id);
}

describe('set migration to another diskport', () => {
  let src: TestServer;
  let dest: ServerProcess;
  let destDir: string;
  let work: string;

  before(async () => {
    work = await tempDir();
    destDir = await tempDir();
    const fast = path.join(destDir, 'fast');
    const bulk = path.join(destDir, 'bulk');
    await fsp.mkdir(fast);
    await fsp.mkdir(bulk);
    dest = await spawnServer(destDir, ['--sr', `fast=${fast}:qcow2,raw`, '--sr', `bulk=${bulk}:vhd`]);
    src = await startServer({ allowFetch: ['127.0.0.0/8'] });
  });
  after(async () => {
    await src.close();
    await dest.stop();
    await fsp.rm(work, { recursive: true, force: true });
  });

  test('an invalid map is refused whole, every problem listed, before a byte moves', async () => {
    const a = await createVdi(src.url, 8 * MiB);
    const b = await createVdi(src.url, 8 * MiB, { image_format: 'qcow2' });
    const set = (
      await api<{ id: string }>(src.url, 'POST', '/v1/disk-sets', { name_label: 'v', vdis: [a.id, b.id] })
    ).body;
    const token = await receiveToken(dest.url);
    const before = await vdiIds(dest.url);
    const res = await api<ErrorBody>(src.url, 'POST', `/v1/disk-sets/${set.id}/migrate`, {
      dest: token,
      map: {
        [a.id]: { sr: 'nowhere' },
        [b.id]: { sr: 'bulk', image_format: 'qcow2' },
        'not-a-member': { mode: 'skip' },
      },
    });
    assert.equal(res.status, 400);
    assert.equal(res.body.error.code, 'MIGRATION_INVALID');
    const problems = res.body.error.details?.problems ?? [];
    assert.deepEqual(
      problems.map((p) => p.vdi).sort(),
      [a.id, b.id, 'not-a-member'].sort(),
      JSON.stringify(problems),
    );
    assert.match(problems.find((p) => p.vdi === b.id)?.message ?? '', /FORMAT_NOT_SUPPORTED/);

    const badToken = await api<ErrorBody>(src.url, 'POST', `/v1/disk-sets/${set.id}/migrate`, {
      dest: 'garbage',
    });
    assert.equal(badToken.status, 400);
    assert.equal(badToken.body.error.code, 'MIGRATION_TOKEN_INVALID');
    const badMode = await api(src.url, 'POST', `/v1/disk-sets/${set.id}/migrate`, {
      dest: token,
      map: { [a.id]: { mode: 'move' } },
    });
    assert.equal(badMode.status, 400);

    assert.deepEqual(await vdiIds(dest.url), before, 'nothing was made on the destination');
    assert.deepEqual(await vdiIds(src.url, '?is_snapshot=true'), [], 'nor any snapshot here');
  });

  test('the receive token opens its own migration only, and no management call', async () => {
    const token = await receiveToken(dest.url);
    const { url, id, secret } = JSON.parse(Buffer.from(token, 'base64url').toString('utf8'));
    assert.equal(url, dest.url);
    const auth = { authorization: `Bearer ${secret}` };
    assert.equal((await api(dest.url, 'GET', `/v1/migrations/${id}`, undefined, auth)).status, 200);
    const other = JSON.parse(Buffer.from(await receiveToken(dest.url), 'base64url').toString('utf8'));
    assert.equal((await api(dest.url, 'GET', `/v1/migrations/${other.id}`, undefined, auth)).status, 403);
    const made = await api<{ id: string }>(
      dest.url,
      'POST',
      `/v1/migrations/${id}/vdis`,
      { name_label: 'x', virtual_size: MiB },
      auth,
    );
    assert.equal(made.status, 201);
    // A ticket whose id the source chose says what it holds: what a resume sends no more.
    const ticket = randomUUID();
    const opened = await api<{ ticket: string; url: string }>(
      dest.url,
      'POST',
      `/v1/migrations/${id}/vdis/${made.body.id}/tickets`,
      { ticket },
      auth,
    );
    assert.deepEqual(opened.body, { ticket, url: `/images/${ticket}` });
    const put = await fetch(`${dest.url}/images/${ticket}`, {
      method: 'PUT',
      headers: { 'content-range': 'bytes 4096-8191/*' },
      body: new Uint8Array(Buffer.alloc(4096, 7)),
    });
    assert.equal(put.status, 200, await put.text());
    const held = await api<{ state: string; vdi: string; received: number[][] }>(
      dest.url,
      'GET',
      `/v1/migrations/${id}/tickets/${ticket}`,
      undefined,
      auth,
    );
    assert.deepEqual(held.body, { ticket, vdi: made.body.id, state: 'open', received: [[4096, 8192]] });
    const unknown = await api<ErrorBody>(
      dest.url,
      'GET',
      `/v1/migrations/${id}/tickets/nope`,
      undefined,
      auth,
    );
    assert.equal(unknown.body.error.code, 'IMAGEIO_TICKET_NOT_FOUND');
    const abort = await api<{ state: string }>(dest.url, 'DELETE', `/v1/migrations/${id}`, undefined, auth);
    assert.equal(abort.body.state, 'aborted');
    assert.equal(
      (await api(dest.url, 'GET', `/v1/vdis/${made.body.id}`)).status,
      404,
      'an abort deletes its VDIs',
    );
    const closed = await api<ErrorBody>(
      dest.url,
      'POST',
      `/v1/migrations/${id}/vdis`,
      { name_label: 'x', virtual_size: MiB },
      auth,
    );
    assert.equal(closed.body.error.code, 'MIGRATION_NOT_OPEN');
  });

  test('the receive token advertises --public-url (DISKPORT_PUBLIC_URL) when set, else the Host it was asked at', async () => {
    const config = parseConfig(['--public-url', 'https://dr.example:8443/diskport/'], {});
    assert.equal(config.publicUrl, 'https://dr.example:8443/diskport');
    assert.equal(
      parseConfig([], { DISKPORT_PUBLIC_URL: 'http://10.1.2.3:8080' }).publicUrl,
      'http://10.1.2.3:8080',
    );
    assert.equal(parseConfig([], {}).publicUrl, undefined);
    for (const bad of ['not a url', 'ftp://x', 'http://x/?token=1']) {
      assert.throws(() => parseConfig(['--public-url', bad], {}), /public-url|URL|query/, bad);
    }
    const behind = await startServer({ config: { publicUrl: config.publicUrl } });
    try {
      const token = await receiveToken(behind.url);
      assert.equal(JSON.parse(Buffer.from(token, 'base64url').toString('utf8')).url, config.publicUrl);
    } finally {
      await behind.close();
    }
  });

  test('3 VDIs (raw with 1 GiB of data, vhd, qcow2) go each to its SR and format, one blank; a write during it is carried', {
    timeout: 600_000,
  }, async () => {
    const big = await createVdi(src.url, GiB);
    await fill(src.url, big.id, await randomFile(work, 'big.raw', GiB));
    const mid = await createVdi(src.url, 64 * MiB, { image_format: 'vhd' });
    await fill(src.url, mid.id, await randomFile(work, 'mid.raw', 16 * MiB));
    const scratch = await createVdi(src.url, 32 * MiB, { image_format: 'qcow2' });
    await fill(src.url, scratch.id, await randomFile(work, 'scratch.raw', 32 * MiB));
    const set = (
      await api<{ id: string }>(src.url, 'POST', '/v1/disk-sets', {
        name_label: 'vm',
        vdis: [big.id, mid.id, scratch.id],
      })
    ).body;
    const bigSum = await checksum(src.url, big.id);

    const started = await api<Task>(src.url, 'POST', `/v1/disk-sets/${set.id}/migrate`, {
      dest: await receiveToken(dest.url),
      map: {
        [big.id]: { sr: 'bulk', image_format: 'vhd' },
        [mid.id]: { sr: 'fast', image_format: 'qcow2' },
        [scratch.id]: { sr: 'fast', image_format: 'raw', mode: 'blank' },
      },
    });
    assert.equal(started.status, 202, JSON.stringify(started.body));
    assert.equal(started.body.type, 'set-migrate');
    const disks = started.body.result?.disks ?? [];
    assert.equal(disks.length, 3);
    assert.ok(
      disks.every((d) => d.task),
      'a child task per disk from the start',
    );

    // While the big disk is being copied, the vhd one changes: the rounds carry it.
    const bigTask = disks[0].task as string;
    await waitFor(
      'the condition',
      async () => (await api<Task>(src.url, 'GET', `/v1/tasks/${bigTask}`)).body.bytes_done > 0,
      { timeoutMs: 120_000 },
    );
    await fill(src.url, mid.id, await randomFile(work, 'mid2.raw', 64 * MiB));
    const midSum = await checksum(src.url, mid.id);

    const progress: number[] = [];
    let task: Task;
    for (;;) {
      task = (await api<Task>(src.url, 'GET', `/v1/tasks/${started.body.id}?wait=1`)).body;
      progress.push(task.progress);
      if (task.status !== 'running') break;
    }
    assert.equal(task.status, 'success', JSON.stringify(task.error));
    for (let i = 1; i < progress.length; i++)
      assert.ok(progress[i] >= progress[i - 1], `progress went back: ${progress}`);
    assert.ok(progress.length > 2, 'progress was seen along the way');

    const done = task.result?.disks ?? [];
    const destOf = (id: string) => done.find((d) => d.vdi === id)?.dest_vdi as string;
    for (const [id, sr, format] of [
      [big.id, 'bulk', 'vhd'],
      [mid.id, 'fast', 'qcow2'],
      [scratch.id, 'fast', 'raw'],
    ]) {
      const v = await api<{ sr: string; image_format: string }>(dest.url, 'GET', `/v1/vdis/${destOf(id)}`);
      assert.deepEqual([v.body.sr, v.body.image_format], [sr, format]);
    }
    assert.equal(await checksum(dest.url, destOf(big.id)), bigSum);
    assert.equal(
      await checksum(dest.url, destOf(mid.id)),
      midSum,
      'the write made during the migration arrived',
    );
    const zeros = (await api<{ zero: boolean }[]>(dest.url, 'GET', `/v1/vdis/${destOf(scratch.id)}/extents`))
      .body;
    assert.ok(
      zeros.every((e) => e.zero),
      'the blank disk reads as zeros',
    );
    // The final snapshots are what the destination holds.
    for (const f of task.result?.final_snapshots ?? []) {
      assert.equal(await checksum(dest.url, destOf(f.vdi)), await checksum(src.url, f.snapshot));
    }
    for (const d of done) {
      assert.equal((await api<Task>(src.url, 'GET', `/v1/tasks/${d.task}`)).body.status, 'success');
    }
    // The destination's files are what qemu-img reads.
    const midFile = (await fsp.readdir(path.join(destDir, 'fast'))).find(
      (f) => f.startsWith(destOf(mid.id)) && f.endsWith('.qcow2'),
    );
    assert.ok(midFile);
    await execFileP('qemu-img', ['check', '-f', 'qcow2', path.join(destDir, 'fast', midFile)]);
    const bigFile = (await fsp.readdir(path.join(destDir, 'bulk'))).find(
      (f) => f.startsWith(destOf(big.id)) && f.endsWith('.vhd'),
    );
    assert.ok(bigFile);
    const info = JSON.parse(
      (
        await execFileP('qemu-img', [
          'info',
          '--output=json',
          '-f',
          'vpc',
          path.join(destDir, 'bulk', bigFile),
        ])
      ).stdout,
    );
    assert.equal(info['virtual-size'], GiB);
  });

  test('a cancel mid-way leaves nothing on the destination and the source as it was', async () => {
    const big = await createVdi(src.url, 512 * MiB);
    await fill(src.url, big.id, await randomFile(work, 'c.raw', 512 * MiB));
    const set = (
      await api<{ id: string }>(src.url, 'POST', '/v1/disk-sets', { name_label: 'c', vdis: [big.id] })
    ).body;
    const sum = await checksum(src.url, big.id);
    const destBefore = await vdiIds(dest.url);
    const snapsBefore = await vdiIds(src.url, '?is_snapshot=true');
    const started = await api<Task>(src.url, 'POST', `/v1/disk-sets/${set.id}/migrate`, {
      dest: await receiveToken(dest.url),
    });
    assert.equal(started.status, 202);
    await waitFor(
      'the condition',
      async () => (await api<Task>(src.url, 'GET', `/v1/tasks/${started.body.id}`)).body.bytes_done > 0,
      { timeoutMs: 60_000 },
    );
    assert.equal((await api(src.url, 'POST', `/v1/tasks/${started.body.id}/cancel`)).status, 202);
    const end = (await api<Task>(src.url, 'GET', `/v1/tasks/${started.body.id}?wait=60`)).body;
    assert.equal(end.status, 'cancelled');
    assert.deepEqual(await vdiIds(dest.url), destBefore);
    assert.deepEqual(await vdiIds(src.url, '?is_snapshot=true'), snapsBefore);
    assert.equal(await checksum(src.url, big.id), sum);
  });

  test('diskport migrate moves one VDI (its map, --delete-source) and prints every problem of a bad map', async () => {
    const vdi = await createVdi(src.url, 16 * MiB, { image_format: 'vhd' });
    await fill(src.url, vdi.id, await randomFile(work, 'cli.raw', 16 * MiB));
    const sum = await checksum(src.url, vdi.id);
    const cli = (args: string[]) =>
      execFileP(process.execPath, [...entryArgs('cli/main'), 'migrate', ...args], {
        cwd: ROOT,
      });
    const bad = await cli([
      '--vdi',
      vdi.id,
      '--server',
      src.url,
      '--dest-server',
      dest.url,
      '--map',
      `${vdi.id}=bulk:qcow2`,
    ]).then(
      () => assert.fail('a bad map must fail'),
      (err: { code: number; stderr: string }) => err,
    );
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /FORMAT_NOT_SUPPORTED/);
    const sets = (await api<unknown[]>(src.url, 'GET', '/v1/disk-sets')).body.length;

    const run = await cli([
      '--vdi',
      vdi.id,
      '--server',
      src.url,
      '--dest-server',
      dest.url,
      '--map',
      `${vdi.id}=fast:qcow2`,
      '--delete-source',
      '--json',
    ]);
    const summary = JSON.parse(run.stdout) as { status: string; disks: { vdi: string; dest_vdi: string }[] };
    assert.equal(summary.status, 'success');
    const moved = summary.disks[0].dest_vdi;
    assert.equal(await checksum(dest.url, moved), sum);
    assert.equal(
      (await api<{ image_format: string }>(dest.url, 'GET', `/v1/vdis/${moved}`)).body.image_format,
      'qcow2',
    );
    assert.equal((await api(src.url, 'GET', `/v1/vdis/${vdi.id}`)).status, 404, '--delete-source deleted it');
    assert.equal(
      (await api<unknown[]>(src.url, 'GET', '/v1/disk-sets')).body.length,
      sets,
      "the run's own set is gone",
    );
  });

  test('diskport migrate on a terminal draws a bar per disk and one for the total, each at 100% at the end, then says what moved', async () => {
    const copied = await createVdi(src.url, 32 * MiB);
    await fill(src.url, copied.id, await randomFile(work, 'bars.raw', 24 * MiB));
    const blank = await createVdi(src.url, 16 * MiB, { image_format: 'qcow2' });
    const skipped = await createVdi(src.url, 8 * MiB);
    const set = (
      await api<{ id: string }>(src.url, 'POST', '/v1/disk-sets', {
        name_label: 'bars',
        vdis: [copied.id, blank.id, skipped.id],
      })
    ).body;
    const command = [
      process.execPath,
      ...entryArgs('cli/main'),
      'migrate',
      '--set',
      set.id,
      '--server',
      src.url,
      '--dest-server',
      dest.url,
      '--map',
      `${copied.id}=fast:raw`,
      '--map',
      `${blank.id}=fast:qcow2:blank`,
      '--map',
      `${skipped.id}=skip`,
    ];
    // script(1) gives the CLI a terminal: the bars are drawn only on one.
    // A wide terminal: a bar line longer than it would be cut at its edge.
    const { stdout } = await execFileP(
      'script',
      ['-qfec', `stty cols 200 rows 50; ${command.join(' ')}`, '/dev/null'],
      {
        cwd: ROOT,
        maxBuffer: 64 * MiB,
      },
    );
    // Terminal control sequences out; each redraw of the bars becomes its own lines.
    // biome-ignore lint/suspicious/noControlCharactersInRegex: the escapes a terminal gets
    const text = stdout.replace(/\x1b\[[0-9;?]*[A-Za-z]/g, '\n').replace(/\r/g, '\n');
    const lines = text.split('\n').map((l) => l.trim());
    const bar = (label: RegExp) => lines.filter((l) => label.test(l) && /\[[=\- ]*\]|\d+%/.test(l));
    const copyBars = bar(new RegExp(`^${copied.id.slice(0, 8)} copy`));
    const blankBars = bar(new RegExp(`^${blank.id.slice(0, 8)} blank`));
    const totalBars = bar(/^total/);
    assert.ok(copyBars.length > 0, `a bar for the copied disk:\n${text}`);
    assert.ok(blankBars.length > 0, `a bar for the blank disk:\n${text}`);
    assert.ok(totalBars.length > 0, `a bar for the total:\n${text}`);
    assert.equal(bar(new RegExp(`^${skipped.id.slice(0, 8)}`)).length, 0, 'no bar for a skipped disk');
    for (const bars of [copyBars, blankBars, totalBars]) {
      assert.match(bars[bars.length - 1], /100% \| /, `ends full: ${bars.slice(-3).join(' / ')}`);
    }
    assert.match(
      copyBars[copyBars.length - 1],
      /24\.0 MiB \/ 24\.0 MiB/,
      `the copied disk counts its data: ${copyBars.slice(-2).join(' / ')}`,
    );
    assert.match(
      totalBars[totalBars.length - 1],
      /24\.0 MiB \/ 24\.0 MiB/,
      `the total adds the disks up: ${totalBars.slice(-2).join(' / ')}`,
    );
    // The end: the summary names every disk moved and where it went.
    const summary = lines.findIndex((l) => /^diskport: migrated 3 disk\(s\), task /.test(l));
    assert.ok(summary >= 0, `the summary:\n${text}`);
    const after = lines.slice(summary).join('\n');
    assert.match(after, new RegExp(`${copied.id} \\(copy\\) -> [0-9a-f-]{36}`));
    assert.match(after, new RegExp(`${blank.id} \\(blank\\) -> [0-9a-f-]{36}`));
    assert.match(after, new RegExp(`${skipped.id} \\(skip\\) -> -`));
  });

  test('a destination killed during the second disk: the source fails and is as it was; the destination removes the half set', async () => {
    const small = await createVdi(src.url, 8 * MiB);
    await fill(src.url, small.id, await randomFile(work, 's.raw', 8 * MiB));
    const big = await createVdi(src.url, 512 * MiB);
    await fill(src.url, big.id, await randomFile(work, 'k.raw', 512 * MiB));
    const set = (
      await api<{ id: string }>(src.url, 'POST', '/v1/disk-sets', {
        name_label: 'k',
        vdis: [small.id, big.id],
      })
    ).body;
    const sums = [await checksum(src.url, small.id), await checksum(src.url, big.id)];
    const destBefore = await vdiIds(dest.url);
    const snapsBefore = await vdiIds(src.url, '?is_snapshot=true');
    const ttlSeconds = 20;
    const started = await api<Task>(src.url, 'POST', `/v1/disk-sets/${set.id}/migrate`, {
      dest: await receiveToken(dest.url, { ttl_seconds: ttlSeconds }),
    });
    const expiresAt = Date.now() + ttlSeconds * 1000;
    const second = started.body.result?.disks[1].task as string;
    await waitFor(
      'the condition',
      async () => (await api<Task>(src.url, 'GET', `/v1/tasks/${second}`)).body.bytes_done > 0,
      { timeoutMs: 60_000 },
    );
    await dest.stop('SIGKILL');
    const end = (await api<Task>(src.url, 'GET', `/v1/tasks/${started.body.id}?wait=60`)).body;
    assert.equal(end.status, 'failure');
    assert.equal(end.error?.code, 'REMOTE_UNAVAILABLE');
    assert.deepEqual(await vdiIds(src.url, '?is_snapshot=true'), snapsBefore);
    assert.deepEqual([await checksum(src.url, small.id), await checksum(src.url, big.id)], sums);

    // Restarted after the token's expiry, the destination aborts the migration: its VDIs go.
    await new Promise((r) => setTimeout(r, Math.max(0, expiresAt - Date.now() + 500)));
    dest = await spawnServer(destDir, [
      '--sr',
      `fast=${path.join(destDir, 'fast')}:qcow2,raw`,
      '--sr',
      `bulk=${path.join(destDir, 'bulk')}:vhd`,
    ]);
    await waitFor('the condition', async () => (await vdiIds(dest.url)).length === destBefore.length, {
      timeoutMs: 30_000,
    });
    assert.deepEqual((await vdiIds(dest.url)).sort(), [...destBefore].sort());
  });
});
