/**
 * Snapshots and clones across restarts of a real process: a clean stop keeps
 * everything; a kill -9 while snapshots are being made (and the source is
 * being imported into) leaves every VDI and snapshot readable with content it
 * really had, every snapshot whose 201 reached the client, and no file that
 * no row names (nor a name shared by rows that should not share it).
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { api, createVdi, sha256Url } from './helpers/api.js';
import { queryAt, rounds } from './helpers/pg.js';
import { prng, type ServerProcess, seededBytes, spawnServer, tempDir } from './helpers/server.js';

const MiB = 1024 * 1024;
const SIZE = 8 * MiB;
const ROUNDS = rounds(12, 5);
const SNAPSHOTS_PER_ROUND = 6;

type VdiJson = {
  id: string;
  name_label: string;
  generation: number;
  image_format: string;
  is_snapshot: boolean;
  read_only: boolean;
  snapshot_of: string | null;
  snapshot_time: string | null;
};

const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

describe('snapshots across restarts and kill -9', () => {
  let dataDir: string;
  let srDir: string;
  let server: ServerProcess;
  const rnd = prng(20261205);

  before(async () => {
    dataDir = await tempDir();
    srDir = path.join(dataDir, 'srs', 'local');
    server = await spawnServer(dataDir);
  });
  after(async () => {
    await server.stop();
    await fsp.rm(dataDir, { recursive: true, force: true });
  });

  async function restart(signal: NodeJS.Signals): Promise<void> {
    await server.stop(signal);
    server = await spawnServer(dataDir);
  }
  const allVdis = async () => {
    const res = await api<VdiJson[]>(server.url, 'GET', '/v1/vdis?limit=1000');
    assert.equal(res.status, 200);
    assert.equal(res.headers.get('link'), null, 'one page holds them all');
    return res.body;
  };
  const shaOf = (id: string) => sha256Url(`${server.url}/v1/vdis/${id}/contents`);
  const importRaw = (id: string, body: Buffer) =>
    fetch(`${server.url}/v1/vdis/${id}/contents?format=raw`, { method: 'PUT', body: new Uint8Array(body) });

  /**
   * Every row's file exists, every generation file belongs to a row, and each
   * file has exactly as many links as names rows give it, a parent of layers
   * counting its own (nothing leaked, nothing
   * about to be freed while a row still needs it).
   */
  async function assertFilesMatchRows(vdis: VdiJson[]): Promise<void> {
    const digestFiles = queryAt<{ digest_file: string }>(
      dataDir,
      'SELECT DISTINCT digest_file FROM vdis WHERE digest_file IS NOT NULL',
    ).map((r) => r.digest_file);
    // A content kept as the parent of layers is on disk under its id too.
    const parents = queryAt<{ parent: string }>(
      dataDir,
      'SELECT DISTINCT parent FROM contents WHERE parent IS NOT NULL',
    ).map((r) => r.parent);
    const named = vdis.map((v) => `${v.id}.g${v.generation}.${v.image_format}`);
    const files = await fsp.readdir(srDir);
    const present = files.filter((n) => /\.g\d+\.(raw|vhd|qcow2)$/.test(n)).sort();
    assert.deepEqual(
      present,
      [...new Set([...named, ...parents])].sort(),
      'the generation files are exactly those the rows name',
    );
    // Block digests are shared by a snapshot and its source's generation: the
    // files present are exactly those some row still names.
    assert.deepEqual(
      files.filter((n) => n.endsWith('.digests')).sort(),
      digestFiles.sort(),
      'the block digest files are exactly those the rows name',
    );
    const namesPerInode = new Map<number, number>();
    const links = new Map<number, number>();
    for (const name of new Set([...named, ...parents])) {
      const st = await fsp.stat(path.join(srDir, name));
      namesPerInode.set(st.ino, (namesPerInode.get(st.ino) ?? 0) + 1);
      links.set(st.ino, st.nlink);
    }
    for (const [ino, names] of namesPerInode)
      assert.equal(links.get(ino), names, `inode ${ino}: links = names`);
    assert.deepEqual(await fsp.readdir(path.join(srDir, '.staging')), []);
  }

  test('a restart keeps VDIs, snapshots and clones, their fields and their bytes', async () => {
    const source = await createVdi(server.url, SIZE, { name_label: 'kept', image_format: 'qcow2' });
    const first = seededBytes(SIZE, 1);
    const second = seededBytes(SIZE, 2);
    assert.equal((await importRaw(source.id, first)).status, 200);
    const snap = (
      await api<VdiJson>(server.url, 'POST', `/v1/vdis/${source.id}/snapshots`, { name_label: 's1' })
    ).body;
    const clone = (await api<VdiJson>(server.url, 'POST', `/v1/vdis/${snap.id}/clone`)).body;
    assert.equal((await importRaw(source.id, second)).status, 200);
    const before = await allVdis();

    await restart('SIGTERM');
    assert.deepEqual(await allVdis(), before);
    const kept = (await api<VdiJson>(server.url, 'GET', `/v1/vdis/${snap.id}`)).body;
    assert.equal(kept.is_snapshot, true);
    assert.equal(kept.snapshot_of, source.id);
    assert.equal(kept.snapshot_time, snap.snapshot_time);
    assert.equal(await shaOf(snap.id), sha256(first));
    assert.equal(await shaOf(clone.id), sha256(first));
    assert.equal(await shaOf(source.id), sha256(second));
    const refused = await api<{ error: { code: string } }>(server.url, 'POST', '/v1/transfers', {
      vdi: snap.id,
      direction: 'upload',
    });
    assert.equal(refused.body.error.code, 'VDI_READ_ONLY', 'still read-only after a restart');
    await assertFilesMatchRows(before);
  });

  test('a link left without its row (a kill between the two) is collected at startup; the source reads on', async () => {
    const source = await createVdi(server.url, SIZE);
    const data = seededBytes(SIZE, 3);
    assert.equal((await importRaw(source.id, data)).status, 200);
    const v = (await api<VdiJson>(server.url, 'GET', `/v1/vdis/${source.id}`)).body;
    const file = path.join(srDir, `${v.id}.g${v.generation}.raw`);
    const stray = path.join(srDir, '0b8e2a4c-1d7f-4e55-9c1a-2f3b4c5d6e7f.g0.raw');
    await fsp.link(file, stray);

    await restart('SIGKILL');
    await assert.rejects(fsp.stat(stray), { code: 'ENOENT' });
    assert.equal((await fsp.stat(file)).nlink, 1);
    assert.equal(await shaOf(source.id), sha256(data));
    await assertFilesMatchRows(await allVdis());
  });

  // A restart of a spawned server per round: minutes on a loaded machine.
  test(`${ROUNDS} kills at random moments of snapshots being made while their source is imported into`, {
    timeout: 600_000,
  }, async () => {
    const source = await createVdi(server.url, SIZE, { name_label: 'busy' });
    const contents = new Map<string, string>(); // sha -> what it is
    const zeros = await shaOf(source.id);
    contents.set(zeros, 'the empty disk');
    const confirmed: { id: string; round: number }[] = [];
    let snapshotsCut = 0;

    for (let round = 0; round < ROUNDS; round++) {
      const next = seededBytes(SIZE, 100 + round);
      contents.set(sha256(next), `round ${round}'s import`);
      const importing = importRaw(source.id, next).catch(() => null);
      let answered: () => void = () => {};
      const firstAnswered = new Promise<void>((resolve) => {
        answered = resolve;
      });
      const snapshots = [...Array(SNAPSHOTS_PER_ROUND).keys()].map(async (k) => {
        await sleep(Math.floor(rnd() * 150));
        try {
          const res = await fetch(`${server.url}/v1/vdis/${source.id}/snapshots`, {
            method: 'POST',
            headers: { 'content-type': 'application/json' },
            body: JSON.stringify({ name_label: `r${round}-${k}` }),
          });
          if (res.status === 201) {
            confirmed.push({ id: ((await res.json()) as VdiJson).id, round });
            answered();
          } else assert.fail(`snapshot: ${res.status} ${await res.text()}`);
        } catch (err) {
          if (err instanceof assert.AssertionError) throw err;
          snapshotsCut++; // the kill came first
        }
      });
      // Even rounds kill once a snapshot has been answered (so some are kept
      // however slow the machine is), odd rounds at a random moment (so some
      // are cut however fast it is).
      if (round % 2 === 0) await Promise.race([firstAnswered, sleep(20_000)]);
      await sleep(Math.floor(rnd() * (round % 2 === 0 ? 40 : 100)));
      await restart('SIGKILL');
      await Promise.all([importing, ...snapshots]);

      const vdis = await allVdis();
      await assertFilesMatchRows(vdis);
      for (const c of confirmed)
        assert.ok(
          vdis.some((v) => v.id === c.id),
          `snapshot of round ${c.round} kept`,
        );
      for (const v of vdis.filter((x) => x.id === source.id || x.snapshot_of === source.id)) {
        const sha = await shaOf(v.id);
        assert.ok(contents.has(sha), `${v.name_label} (${v.id}) reads content it really had`);
      }
    }
    assert.ok(confirmed.length > 0, 'some snapshots were made before a kill');
    assert.ok(snapshotsCut > 0, 'some snapshot requests were cut by a kill');
  });
});
