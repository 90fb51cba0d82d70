/**
 * PostgreSQL restarted mid-transfer: a diskport on a PostgreSQL cluster of
 * the test's own (stopped and started again with pg_ctl, as an operator's
 * restart or a fail-over would) holds an upload session half-way. While the
 * database is down, clients get 503 METADATA_UNAVAILABLE with Retry-After,
 * in the usual JSON error, and the process stays up; nothing that was
 * acknowledged is lost; once it is back, the session resumes from what it
 * had and finalizes byte-exact.
 *
 * A cluster of its own, not the PostgreSQL pass's: stopping that one would
 * cut the servers of the file that runs beside this one. SQLite has no
 * server to restart, so the SQLite pass skips this file.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import { promises as fsp } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import { describeErrors, schemaValidator } from '../src/http/openapi.js';
import { api, createVdi, sha256Url } from './helpers/api.js';
import { TEST_DATABASE_URL } from './helpers/pg.js';
import { ROOT, type ServerProcess, seededBytes, spawnServer, tempDir } from './helpers/server.js';
import { waitFor } from './helpers/wait.js';

const execFileP = promisify(execFile);
const MiB = 1024 * 1024;
const SKIP =
  !TEST_DATABASE_URL &&
  'needs a PostgreSQL server to restart: runs in the PostgreSQL pass (npm run test:postgres)';

type ErrorBody = { error: { code: string; message: string } };
type TransferBody = { id: string; token: string; data_path: string; task_id: string; received: number[][] };

function pgCluster(...args: string[]) {
  return execFileP('bash', [path.join(ROOT, 'scripts/pg-cluster.sh'), ...args]);
}

async function freePort(): Promise<number> {
  const probe = net.createServer().listen(0, '127.0.0.1');
  await new Promise((r) => probe.once('listening', r));
  const { port } = probe.address() as net.AddressInfo;
  await new Promise((r) => probe.close(r));
  return port;
}

/** One chunk PUT whose body the test feeds: `send` writes, `end` ends it and gives the answer. */
function streamingPut(url: string, start: number, end: number, total: number) {
  const req = http.request(url, {
    method: 'PUT',
    headers: { 'content-range': `bytes ${start}-${end - 1}/${total}`, 'content-length': String(end - start) },
  });
  const answer = new Promise<{ status: number; headers: http.IncomingHttpHeaders; body: string }>(
    (resolve, reject) => {
      req.on('error', reject);
      req.on('response', (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (d) => {
          body += d;
        });
        res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }));
      });
    },
  );
  return {
    send: (bytes: Buffer) => new Promise<void>((r) => (req.write(bytes) ? r() : req.once('drain', r))),
    end: (bytes: Buffer) => {
      req.end(bytes);
      return answer;
    },
  };
}

const errorSchema = schemaValidator('#/components/schemas/Error');

/** A 503 METADATA_UNAVAILABLE with Retry-After, in the JSON error every other failure has. */
async function assertUnavailable(res: Response, what: string) {
  const text = await res.text();
  assert.equal(res.status, 503, `${what}: ${text}`);
  assert.equal(res.headers.get('retry-after'), '5', what);
  assert.match(res.headers.get('content-type') ?? '', /json/, what);
  const body = JSON.parse(text) as ErrorBody;
  assert.ok(errorSchema(body), `${what}: ${describeErrors(errorSchema.errors, 'response')}`);
  assert.equal(body.error.code, 'METADATA_UNAVAILABLE', what);
  assert.match(body.error.message, /metadata database cannot be reached.*retry/, what);
}

describe('PostgreSQL restarted mid-transfer', { skip: SKIP }, () => {
  let clusterDir: string;
  let dataDir: string;
  let databaseUrl: string;
  let srv: ServerProcess | undefined;

  before(async () => {
    clusterDir = await tempDir('diskport-test-pgcluster-');
    dataDir = await tempDir();
    const port = await freePort();
    await pgCluster('init', clusterDir, String(port));
    databaseUrl = `postgres://postgres@127.0.0.1:${port}/diskport`;
    await execFileP('psql', [
      '-X',
      '-q',
      `postgres://postgres@127.0.0.1:${port}/postgres`,
      '-c',
      'CREATE DATABASE diskport',
    ]);
  });
  after(async () => {
    await srv?.stop();
    await pgCluster('remove', clusterDir).catch(() => {});
    await fsp.rm(dataDir, { recursive: true, force: true });
  });

  test('503 with Retry-After while it is down, nothing acknowledged lost, the session finalized byte-exact once it is back', async () => {
    srv = await spawnServer(dataDir, ['--database-url', databaseUrl]);
    const base = srv.url;
    const data = seededBytes(16 * MiB, 15);
    const put = (url: string, start: number, end: number) =>
      fetch(url, {
        method: 'PUT',
        headers: { 'content-range': `bytes ${start}-${end - 1}/${data.length}` },
        body: new Uint8Array(data.subarray(start, end)),
      });

    const vdi = await createVdi(base, data.length, { name_label: 'before the restart' });
    const t = (
      await api<TransferBody>(base, 'POST', '/v1/transfers', {
        vdi: vdi.id,
        direction: 'upload',
        format: 'raw',
        size: data.length,
      })
    ).body;
    const url = `${base}${t.data_path}?token=${t.token}`;
    const finalizeUrl = `${base}${t.data_path.replace(/\/data$/, '/finalize')}?token=${t.token}`;
    // A second session whose every byte has arrived: its finalize comes while the database is down.
    const small = seededBytes(MiB, 16);
    const vdi2 = await createVdi(base, small.length, { name_label: 'finalized after the restart' });
    const t2 = (
      await api<TransferBody>(base, 'POST', '/v1/transfers', {
        vdi: vdi2.id,
        direction: 'upload',
        format: 'raw',
        size: small.length,
      })
    ).body;
    const finalize2Url = `${base}${t2.data_path.replace(/\/data$/, '/finalize')}?token=${t2.token}`;
    assert.equal(
      (
        await fetch(`${base}${t2.data_path}?token=${t2.token}`, {
          method: 'PUT',
          body: new Uint8Array(small),
        })
      ).status,
      200,
    );
    // Acknowledged (a flush point each): these must survive the restart.
    assert.equal((await put(url, 0, 4 * MiB)).status, 200);
    assert.equal((await put(url, 4 * MiB, 8 * MiB)).status, 200);

    // A chunk half-way through its body when PostgreSQL goes down.
    const inFlight = streamingPut(url, 8 * MiB, 12 * MiB, data.length);
    await inFlight.send(data.subarray(8 * MiB, 10 * MiB));
    await pgCluster('stop', clusterDir, 'fast');
    const cut = await inFlight.end(data.subarray(10 * MiB, 12 * MiB));
    assert.equal(cut.status, 503, cut.body);
    assert.equal(cut.headers['retry-after'], '5');
    assert.equal((JSON.parse(cut.body) as ErrorBody).error.code, 'METADATA_UNAVAILABLE');

    // While it is down: management calls, chunks and the finalize all answer 503, and the process stays up.
    for (const [method, p, body] of [
      ['GET', '/v1/vdis', undefined],
      ['GET', `/v1/transfers/${t.id}`, undefined],
      ['POST', '/v1/vdis', { name_label: 'while down', virtual_size: MiB }],
    ] as const) {
      const res = await fetch(base + p, {
        method,
        headers: body ? { 'content-type': 'application/json' } : {},
        body: body && JSON.stringify(body),
      });
      await assertUnavailable(res, `${method} ${p}`);
    }
    await assertUnavailable(await put(url, 12 * MiB, 16 * MiB), 'a chunk PUT');
    await assertUnavailable(await fetch(finalize2Url, { method: 'POST' }), 'a finalize');
    assert.equal(srv.child.exitCode, null, 'diskport is still running');

    await pgCluster('start', clusterDir);
    // A client retries after Retry-After; the test polls instead of sleeping.
    await waitFor('diskport answering again', async () => (await fetch(`${base}/v1/vdis`)).status === 200, {
      timeoutMs: 60_000,
      intervalMs: 200,
    });

    // Nothing acknowledged was lost: the VDI, the session and its first 8 MiB.
    const vdis = await api<{ id: string; name_label: string }[]>(base, 'GET', '/v1/vdis');
    assert.deepEqual(vdis.body.map((v) => v.name_label).sort(), [
      'before the restart',
      'finalized after the restart',
    ]);
    const session = await api<TransferBody & { state: string }>(base, 'GET', `/v1/transfers/${t.id}`);
    assert.equal(session.status, 200);
    assert.equal(session.body.state, 'open');
    const head = await fetch(url, { method: 'HEAD' });
    const offset = Number(head.headers.get('upload-offset'));
    assert.ok(offset >= 8 * MiB && offset <= 12 * MiB, `Upload-Offset ${offset}`);

    // The client resumes from Upload-Offset, as after any broken upload, and finalizes.
    assert.equal((await put(url, offset, data.length)).status, 200);
    const done = await fetch(`${finalizeUrl}&wait=60`, { method: 'POST' });
    assert.equal(done.status, 202, await done.text());
    const task = await waitFor(
      'the import task to finish',
      async () => {
        const res = await api<{ status: string; error: unknown }>(base, 'GET', `/v1/tasks/${t.task_id}`);
        return ['success', 'failure', 'cancelled'].includes(res.body.status) ? res.body : undefined;
      },
      { timeoutMs: 120_000, intervalMs: 200 },
    );
    assert.equal(task.status, 'success', JSON.stringify(task));
    assert.equal(
      await sha256Url(`${base}/v1/vdis/${vdi.id}/contents`),
      createHash('sha256').update(data).digest('hex'),
    );

    // The finalize refused while the database was down goes through now, as its client retries it.
    const retried = await fetch(`${finalize2Url}&wait=60`, { method: 'POST' });
    assert.equal(retried.status, 202, await retried.text());
    const task2 = await waitFor(
      'the second import task to finish',
      async () => {
        const res = await api<{ status: string }>(base, 'GET', `/v1/tasks/${t2.task_id}`);
        return ['success', 'failure', 'cancelled'].includes(res.body.status) ? res.body : undefined;
      },
      { timeoutMs: 120_000, intervalMs: 200 },
    );
    assert.equal(task2.status, 'success', JSON.stringify(task2));
    assert.equal(
      await sha256Url(`${base}/v1/vdis/${vdi2.id}/contents`),
      createHash('sha256').update(small).digest('hex'),
    );
  });

  test('a task that ends while it is down is recorded once it is back, not left running', async () => {
    assert.ok(srv, 'the server of the test before');
    const base = srv.url;
    const data = seededBytes(64 * MiB, 17);
    const vdi = await createVdi(base, data.length);
    const put = await fetch(`${base}/v1/vdis/${vdi.id}/contents?format=raw`, {
      method: 'PUT',
      body: new Uint8Array(data),
    });
    assert.equal(put.status, 200, await put.text());
    // A whole export (a task) read slowly: it ends after PostgreSQL went down.
    const res = await new Promise<http.IncomingMessage>((resolve, reject) =>
      http.get(`${base}/v1/vdis/${vdi.id}/contents?format=raw`, resolve).on('error', reject),
    );
    res.pause();
    assert.equal(res.statusCode, 200);
    const taskId = String(res.headers['x-task-id']);
    await pgCluster('stop', clusterDir, 'fast');
    const hash = createHash('sha256');
    res.on('data', (d: Buffer) => hash.update(d));
    res.resume();
    await once(res, 'end');
    assert.equal(hash.digest('hex'), createHash('sha256').update(data).digest('hex'));
    // This node answers its outcome meanwhile, from memory.
    const during = await waitFor('the export task to end', async () => {
      const t = await api<{ status: string }>(base, 'GET', `/v1/tasks/${taskId}`);
      return t.body.status === 'running' ? undefined : t;
    });
    assert.equal(during.status, 200);
    assert.equal(during.body.status, 'success');

    await pgCluster('start', clusterDir);
    // Recorded where every node reads it, not only in this process.
    await waitFor(
      'the task recorded as ended in the database',
      async () => {
        const { stdout } = await execFileP('psql', [
          '-X',
          '-A',
          '-t',
          databaseUrl,
          '-c',
          `SELECT status FROM tasks WHERE id = '${taskId}'`,
        ]).catch(() => ({ stdout: '' }));
        return stdout.trim() === 'success';
      },
      { timeoutMs: 60_000, intervalMs: 200 },
    );
  });
});
