/**
 * A database the previous diskport wrote, where a session's own fields
 * (stream epoch, one-shot and tus marks, push target, pull validator) were
 * "diskport.*" keys inside its metadata: the new server migrates it, and
 * every kind of session that was open when the old one died goes on.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import { createReadStream, promises as fsp } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import Database from 'better-sqlite3';
import { MIGRATIONS, openDb, sqliteMigration } from '../src/storage/db.js';
import { api, createVdi, execFileP, sha256File, sha256Url, type TransferJson } from './helpers/api.js';
import { sqliteOnly } from './helpers/pg.js';
import {
  type ServerProcess,
  seededBytes,
  spawnServer,
  startServer,
  type TestServer,
  tempDir,
} from './helpers/server.js';
import { waitFor } from './helpers/wait.js';

/** The versions before this migration kept their metadata in SQLite only: a PostgreSQL database begins after it. */
const PREVIOUS_ONLY_SQLITE = sqliteOnly("the previous version's database, always SQLite's file");

const MiB = 1024 * 1024;
const VIRTUAL_SIZE = 40 * MiB + 7 * 512;
const TUS = { 'tus-resumable': '1.0.0' };
const b64 = (s: string) => Buffer.from(s).toString('base64');

/** The schema version before sessions had typed fields: the one the previous diskport left. */
const PREVIOUS_VERSION = MIGRATIONS.findIndex((m) => sqliteMigration(m).includes('ADD COLUMN stream_epoch'));
const OLD_KEYS = [
  'diskport.stream-epoch',
  'diskport.one-shot',
  'diskport.push-target',
  'diskport.source-validator',
  'diskport.tus',
];

type Task = { id: string; status: string; error: { code: string; message: string } | null };

interface NewRow {
  id: string;
  metadata: string | null;
  origin: string;
  stream_epoch: number;
  push_target: string | null;
  source_validator: string | null;
  [column: string]: unknown;
}

/** A session's metadata as the previous version wrote it: its own fields as "diskport.*" keys among the client's. */
function previousMetadata(r: NewRow): string | null {
  const m: Record<string, string> = {};
  if (r.origin === 'tus') m['diskport.tus'] = 'true';
  if (r.origin === 'one-shot') m['diskport.one-shot'] = 'true';
  Object.assign(m, r.metadata ? JSON.parse(r.metadata) : {});
  if (r.push_target) m['diskport.push-target'] = r.push_target;
  if (r.source_validator) m['diskport.source-validator'] = r.source_validator;
  if (r.stream_epoch) m['diskport.stream-epoch'] = String(r.stream_epoch);
  return Object.keys(m).length ? JSON.stringify(m) : null;
}

/**
 * Turns the database a killed server left in `dataDir` into the one the
 * previous version would have left: its schema (the migrations before
 * PREVIOUS_VERSION, at that user_version), every row of its tables, and
 * each session's own fields back inside its metadata.
 */
async function rewriteAsPreviousVersion(dataDir: string): Promise<NewRow[]> {
  const file = path.join(dataDir, 'diskport.sqlite');
  const previous = `${file}.previous`;
  const db = new Database(previous);
  try {
    for (const m of MIGRATIONS.slice(0, PREVIOUS_VERSION)) db.exec(sqliteMigration(m));
    db.pragma(`user_version = ${PREVIOUS_VERSION}`);
    db.prepare('ATTACH DATABASE ? AS cur').run(file);
    const tables = db
      .prepare(`SELECT name FROM main.sqlite_master WHERE type = 'table' ORDER BY rowid`)
      .pluck()
      .all() as string[];
    for (const table of tables) {
      const columns = (db.pragma(`main.table_info(${table})`) as { name: string }[]).map((c) => c.name);
      const insert = db.prepare(
        `INSERT INTO main.${table} (${columns.join(', ')}) VALUES (${columns.map((c) => `@${c}`).join(', ')})`,
      );
      for (const row of db.prepare(`SELECT * FROM cur.${table}`).all() as NewRow[]) {
        const values = Object.fromEntries(columns.map((c) => [c, row[c]]));
        if (table === 'transfers') values.metadata = previousMetadata(row);
        insert.run(values);
      }
    }
    const sessions = db.prepare('SELECT * FROM cur.transfers').all() as NewRow[];
    db.exec('DETACH DATABASE cur');
    return sessions;
  } finally {
    db.close();
    for (const f of [`${file}-wal`, `${file}-shm`]) await fsp.rm(f, { force: true });
    await fsp.rename(previous, file);
  }
}

/** A file server with strong ETags and If-Range: it can cut the first answer, then stall one. */
async function fileServer() {
  const state = {
    file: '',
    etag: '',
    cutAfter: Number.POSITIVE_INFINITY,
    onCut: () => {},
    stallAfter: Number.POSITIVE_INFINITY,
    release: null as (() => void) | null,
    requests: [] as { range?: string; ifRange?: string; status: number }[],
  };
  const server = http.createServer(async (req, res) => {
    const size = (await fsp.stat(state.file)).size;
    const ifRange = req.headers['if-range'] as string | undefined;
    const m =
      req.headers.range && (!ifRange || ifRange === state.etag)
        ? /^bytes=(\d+)-$/.exec(req.headers.range)
        : null;
    const start = m ? Number(m[1]) : 0;
    const status = m ? 206 : 200;
    state.requests.push({ range: req.headers.range, ifRange, status });
    res.writeHead(status, {
      'content-length': String(size - start),
      etag: state.etag,
      'accept-ranges': 'bytes',
      ...(m && { 'content-range': `bytes ${start}-${size - 1}/${size}` }),
    });
    let sent = 0;
    for await (const chunk of createReadStream(state.file, { start, highWaterMark: 256 * 1024 })) {
      const piece = chunk as Buffer;
      if (sent + piece.length > state.cutAfter) {
        state.cutAfter = Number.POSITIVE_INFINITY;
        res.socket?.destroy();
        state.onCut();
        return;
      }
      if (sent + piece.length > state.stallAfter) {
        state.stallAfter = Number.POSITIVE_INFINITY;
        await new Promise<void>((r) => {
          state.release = r;
        });
        res.socket?.destroy();
        return;
      }
      sent += piece.length;
      if (!res.write(piece)) await once(res, 'drain');
    }
    res.end();
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    state,
    url: `http://127.0.0.1:${(server.address() as net.AddressInfo).port}/disk.vhd`,
    close: () => {
      server.closeAllConnections();
      return new Promise((r) => server.close(r));
    },
  };
}

/** A TCP gate in front of `target`: shut, it takes connections and says nothing; open, it relays. */
async function gate(target: URL) {
  const state = { open: false, held: [] as net.Socket[] };
  const server = net.createServer((client) => {
    client.on('error', () => {});
    if (!state.open) {
      state.held.push(client);
      return;
    }
    const upstream = net.connect(Number(target.port), target.hostname);
    upstream.on('error', () => client.destroy());
    client.on('error', () => upstream.destroy());
    client.pipe(upstream).pipe(client);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    state,
    port: (server.address() as net.AddressInfo).port,
    open() {
      for (const s of state.held.splice(0)) s.destroy();
      state.open = true;
    },
    close: () => new Promise((r) => server.close(r)),
  };
}

async function writeSparseDisk(file: string, seed: number): Promise<void> {
  const h = await fsp.open(file, 'w');
  await h.truncate(VIRTUAL_SIZE);
  for (let i = 0; i < 8; i++) {
    const at = Math.floor((i * VIRTUAL_SIZE) / 8 / 512) * 512 + (i % 3) * 4096;
    const data = seededBytes(i % 2 === 0 ? 3 * MiB : 256 * 1024, seed + i);
    await h.write(data, 0, data.length, at);
  }
  await h.close();
}

async function waitTask(base: string, id: string): Promise<Task> {
  for (let i = 0; ; i++) {
    const res = await api<Task>(base, 'GET', `/v1/tasks/${id}?wait=5`);
    if (!['pending', 'running'].includes(res.body.status)) return res.body;
    assert.ok(i < 24, `task still running after two minutes: ${JSON.stringify(res.body)}`);
  }
}

describe('the migration of session fields out of the metadata', { skip: PREVIOUS_ONLY_SQLITE }, () => {
  test('moves each "diskport.*" key of an old row into its field and leaves the client its own keys', async () => {
    const dir = await tempDir();
    try {
      const file = path.join(dir, 'diskport.sqlite');
      const db = new Database(file);
      for (const m of MIGRATIONS.slice(0, PREVIOUS_VERSION)) db.exec(sqliteMigration(m));
      db.pragma(`user_version = ${PREVIOUS_VERSION}`);
      const insert = db.prepare(
        `INSERT INTO transfers (id, vdi_id, direction, format, token_hash, task_id, state, ttl_seconds, expires_at,
           created_at, metadata)
         VALUES (?, 'vdi', 'upload', 'raw', 'hash', 'task', 'open', 3600, '2026-01-01T00:00:00.000Z',
           '2026-01-01T00:00:00.000Z', ?)`,
      );
      const old: Record<string, string | null> = {
        plain: null,
        'one-shot': '{"diskport.one-shot":"true"}',
        tus: '{"diskport.tus":"true","vdi":"vdi","format":"raw","filename":"disk.raw"}',
        push: '{"diskport.push-target":"http://h/v1/transfers/x/data?token=t"}',
        pull: '{"diskport.source-validator":"\\"v-1\\"","diskport.stream-epoch":"2"}',
      };
      for (const [id, metadata] of Object.entries(old)) insert.run(id, metadata);
      db.close();

      const migrated = openDb(file);
      const rows = migrated
        .prepare(
          'SELECT id, metadata, origin, stream_epoch, push_target, source_validator FROM transfers ORDER BY id',
        )
        .all();
      migrated.close();
      assert.deepEqual(rows, [
        {
          id: 'one-shot',
          metadata: null,
          origin: 'one-shot',
          stream_epoch: 0,
          push_target: null,
          source_validator: null,
        },
        {
          id: 'plain',
          metadata: null,
          origin: 'api',
          stream_epoch: 0,
          push_target: null,
          source_validator: null,
        },
        {
          id: 'pull',
          metadata: null,
          origin: 'api',
          stream_epoch: 2,
          push_target: null,
          source_validator: '"v-1"',
        },
        {
          id: 'push',
          metadata: null,
          origin: 'api',
          stream_epoch: 0,
          push_target: 'http://h/v1/transfers/x/data?token=t',
          source_validator: null,
        },
        {
          id: 'tus',
          metadata: '{"vdi":"vdi","format":"raw","filename":"disk.raw"}',
          origin: 'tus',
          stream_epoch: 0,
          push_target: null,
          source_validator: null,
        },
      ]);
    } finally {
      await fsp.rm(dir, { recursive: true, force: true });
    }
  });
});

describe('a database the previous diskport wrote: its open sessions go on after the upgrade', {
  skip: PREVIOUS_ONLY_SQLITE,
}, () => {
  let dir: string;
  let dataDir: string;
  let a: ServerProcess;
  let receiver: TestServer;
  let files: Awaited<ReturnType<typeof fileServer>>;
  let receiverGate: Awaited<ReturnType<typeof gate>>;
  let oldSessions: NewRow[];
  const pull = { vdi: '', transfer: null as unknown as TransferJson, durable: 0 };
  const push = { source: '', target: '', transfer: null as unknown as TransferJson, receiving: '' };
  const oneShot = { vdi: '', before: '', transfer: '' };
  const tus = { vdi: '', location: '', data: seededBytes(8 * MiB, 31) };

  before(async () => {
    dir = await tempDir();
    dataDir = path.join(dir, 'data');
    const raw = (name: string) => path.join(dir, `${name}.raw`);
    await writeSparseDisk(raw('a'), 700);
    await writeSparseDisk(raw('b'), 900);
    for (const name of ['a', 'b']) {
      await execFileP('qemu-img', [
        'convert',
        '-f',
        'raw',
        '-O',
        'vpc',
        raw(name),
        path.join(dir, `${name}.vhd`),
      ]);
    }
    files = await fileServer();
    receiver = await startServer({ dataDir: path.join(dir, 'receiver') });
    receiverGate = await gate(new URL(receiver.url));
    a = await spawnServer(dataDir, ['--allow-fetch', '127.0.0.0/8']);

    // A pull of a vhd whose source changed once (a reset: epoch 1, a new validator), stalled in its second fetch.
    const bVhdSize = (await fsp.stat(path.join(dir, 'b.vhd'))).size;
    Object.assign(files.state, {
      file: path.join(dir, 'a.vhd'),
      etag: '"source-1"',
      cutAfter: 4 * MiB,
      onCut: () => {
        Object.assign(files.state, {
          file: path.join(dir, 'b.vhd'),
          etag: '"source-2"',
          stallAfter: Math.floor(bVhdSize / 2),
        });
      },
    });
    pull.vdi = (await createVdi(a.url, VIRTUAL_SIZE)).id;
    const pulled = await api<TransferJson>(a.url, 'POST', '/v1/transfers', {
      vdi: pull.vdi,
      direction: 'upload',
      format: 'vhd',
      source_url: files.url,
    });
    assert.equal(pulled.status, 201, JSON.stringify(pulled.body));
    pull.transfer = pulled.body;
    await waitFor('the changed source to stall', () => files.state.release);
    // Only bytes of the new source can count past 4 MiB: wait until a checkpoint made some durable.
    pull.durable = await waitFor('a checkpoint of the new source bytes', async () => {
      const list = await api<TransferJson[]>(a.url, 'GET', `/v1/transfers?vdi=${pull.vdi}`);
      const received = list.body.find((x) => x.id === pull.transfer.id)?.bytes_received ?? 0;
      return received > 4 * MiB ? received : 0;
    });

    // A push whose receiver has not answered yet.
    push.source = (await createVdi(a.url, 8 * MiB)).id;
    const content = seededBytes(6 * MiB, 41);
    const put = await fetch(`${a.url}/v1/vdis/${push.source}/contents?format=raw`, {
      method: 'PUT',
      body: new Uint8Array(content),
    });
    assert.equal(put.status, 200, await put.text());
    push.target = (await createVdi(receiver.url, 8 * MiB)).id;
    const receiving = await api<TransferJson>(receiver.url, 'POST', '/v1/transfers', {
      vdi: push.target,
      direction: 'upload',
      format: 'raw',
    });
    push.receiving = receiving.body.id;
    const targetUrl = new URL(receiving.body.url);
    targetUrl.host = `127.0.0.1:${receiverGate.port}`;
    const pushed = await api<TransferJson>(a.url, 'POST', '/v1/transfers', {
      vdi: push.source,
      direction: 'download',
      format: 'raw',
      target_url: targetUrl.href,
    });
    assert.equal(pushed.status, 201, JSON.stringify(pushed.body));
    push.transfer = pushed.body;
    await waitFor('the push to reach its receiver', () => receiverGate.state.held.length > 0);

    // A one-shot PUT cut mid-body, over content that must stay as it was.
    oneShot.vdi = (await createVdi(a.url, 8 * MiB)).id;
    const earlier = seededBytes(2 * MiB, 51);
    const first = await fetch(`${a.url}/v1/vdis/${oneShot.vdi}/contents?format=raw`, {
      method: 'PUT',
      body: new Uint8Array(earlier),
    });
    assert.equal(first.status, 200, await first.text());
    oneShot.before = await sha256Url(`${a.url}/v1/vdis/${oneShot.vdi}/contents`);
    const req = http.request(`${a.url}/v1/vdis/${oneShot.vdi}/contents?format=raw`, {
      method: 'PUT',
      headers: { 'content-length': String(8 * MiB) },
    });
    req.on('error', () => {}); // the server dies under it
    req.write(seededBytes(MiB, 52));
    oneShot.transfer = await waitFor('the one-shot session', async () => {
      const list = await api<TransferJson[]>(a.url, 'GET', `/v1/transfers?vdi=${oneShot.vdi}`);
      return list.body.find((x) => x.state === 'open')?.id;
    });

    // A tus upload with 3 MiB of its 8 received.
    tus.vdi = (await createVdi(a.url, 8 * MiB)).id;
    const created = await fetch(`${a.url}/v1/tus/`, {
      method: 'POST',
      headers: {
        ...TUS,
        'upload-length': String(tus.data.length),
        'upload-metadata': `vdi ${b64(tus.vdi)},format ${b64('raw')}`,
      },
    });
    assert.equal(created.status, 201);
    tus.location = new URL(created.headers.get('location')!, a.url).pathname;
    const patched = await fetch(`${a.url}${tus.location}`, {
      method: 'PATCH',
      headers: { ...TUS, 'upload-offset': '0', 'content-type': 'application/offset+octet-stream' },
      body: new Uint8Array(tus.data.subarray(0, 3 * MiB)),
    });
    assert.equal(patched.status, 204);

    await a.stop('SIGKILL');
    req.destroy();
    files.state.release?.();
    receiverGate.open();
    oldSessions = await rewriteAsPreviousVersion(dataDir);
    a = await spawnServer(dataDir, ['--allow-fetch', '127.0.0.0/8']);
  });
  after(async () => {
    await a?.stop();
    await receiver?.close();
    await files?.close();
    await receiverGate?.close();
    await fsp.rm(dir, { recursive: true, force: true });
  });

  test('the rewritten database is the previous shape: every session field was inside the metadata', () => {
    const byId = new Map(oldSessions.map((r) => [r.id, r]));
    assert.equal(byId.get(pull.transfer.id)?.stream_epoch, 1, 'the pull was reset once');
    assert.equal(byId.get(pull.transfer.id)?.source_validator, '"source-2"');
    assert.ok(byId.get(push.transfer.id)?.push_target?.includes(`:${receiverGate.port}/`));
    assert.equal(byId.get(oneShot.transfer)?.origin, 'one-shot');
    assert.equal(byId.get(tus.location.split('/').pop()!)?.origin, 'tus');
    const db = new Database(path.join(dataDir, 'diskport.sqlite'), { readonly: true });
    try {
      // The new server has migrated it by now: nothing of diskport's is left among the client's keys.
      const left = db
        .prepare('SELECT metadata FROM transfers WHERE metadata IS NOT NULL')
        .pluck()
        .all() as string[];
      for (const m of left) for (const key of OLD_KEYS) assert.ok(!(key in JSON.parse(m)), `${key} in ${m}`);
    } finally {
      db.close();
    }
  });

  test('a reset pull (stream epoch 1) resumes with If-Range on its validator, into the disk its epoch streamed', async () => {
    const task = await waitTask(a.url, pull.transfer.task_id);
    assert.equal(task.status, 'success', JSON.stringify(task));
    const resumed = files.state.requests[2];
    assert.equal(files.state.requests.length, 3, JSON.stringify(files.state.requests));
    assert.equal(resumed.ifRange, '"source-2"', 'the validator survived the upgrade');
    assert.equal(resumed.status, 206);
    assert.ok(Number(/^bytes=(\d+)-$/.exec(resumed.range ?? '')?.[1]) >= pull.durable, resumed.range);
    assert.equal(
      await sha256Url(`${a.url}/v1/vdis/${pull.vdi}/contents`),
      await sha256File(path.join(dir, 'b.raw')),
    );
  });

  test('a push resumes to the receiver its session kept, and the receiver commits the same disk', async () => {
    const task = await waitTask(a.url, push.transfer.task_id);
    assert.equal(task.status, 'success', JSON.stringify(task));
    const remote = await api<TransferJson>(receiver.url, 'GET', `/v1/transfers/${push.receiving}`);
    assert.equal(remote.body.state, 'committed');
    assert.equal(
      await sha256Url(`${receiver.url}/v1/vdis/${push.target}/contents`),
      await sha256Url(`${a.url}/v1/vdis/${push.source}/contents`),
    );
  });

  test('a one-shot import is still known as one: failed, its VDI as it was and free for a new upload', async () => {
    const t = await api<TransferJson>(a.url, 'GET', `/v1/transfers/${oneShot.transfer}`);
    assert.equal(t.body.state, 'failed');
    const task = await waitTask(a.url, t.body.task_id);
    assert.equal(task.status, 'failure');
    assert.equal(await sha256Url(`${a.url}/v1/vdis/${oneShot.vdi}/contents`), oneShot.before);
    const next = await api<TransferJson>(a.url, 'POST', '/v1/transfers', {
      vdi: oneShot.vdi,
      direction: 'upload',
      format: 'raw',
    });
    assert.equal(next.status, 201, JSON.stringify(next.body));
    assert.equal((await api(a.url, 'DELETE', `/v1/transfers/${next.body.id}`)).status, 200);
  });

  test("a tus upload resumes at its offset; HEAD gives back the client's metadata only", async () => {
    const head = await fetch(`${a.url}${tus.location}`, { method: 'HEAD', headers: TUS });
    assert.equal(head.status, 200);
    assert.equal(head.headers.get('upload-offset'), String(3 * MiB));
    const metadata = Object.fromEntries(
      (head.headers.get('upload-metadata') ?? '').split(',').map((pair) => {
        const [key, value = ''] = pair.trim().split(' ');
        return [key, Buffer.from(value, 'base64').toString()];
      }),
    );
    assert.deepEqual(metadata, { vdi: tus.vdi, format: 'raw' });
    const last = await fetch(`${a.url}${tus.location}`, {
      method: 'PATCH',
      headers: {
        ...TUS,
        'upload-offset': String(3 * MiB),
        'content-type': 'application/offset+octet-stream',
      },
      body: new Uint8Array(tus.data.subarray(3 * MiB)),
    });
    assert.equal(last.status, 204, await last.text());
    assert.equal(
      await sha256Url(`${a.url}/v1/vdis/${tus.vdi}/contents`),
      createHash('sha256').update(tus.data).digest('hex'),
    );
  });

  test('once every session has ended, no staging file is left', async () => {
    for (const task of [pull.transfer.task_id, push.transfer.task_id]) await waitTask(a.url, task);
    await waitFor('an empty staging directory', async () => {
      const left = await fsp.readdir(path.join(dataDir, 'srs', 'local', '.staging'));
      return left.length === 0;
    });
  });
});
