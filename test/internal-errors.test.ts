/**
 * A failure of diskport's own (here: an upload's staging file removed under
 * it before the commit) reaches the client as INTERNAL_ERROR with a generic
 * message and an id to quote; the path and the errno go to the log only.
 */
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { Writable } from 'node:stream';
import { after, before, describe, test } from 'node:test';
import { INTERNAL_ERROR_MESSAGE } from '../src/errors.js';
import { api, createVdi, type TransferJson } from './helpers/api.js';
import { seededBytes, startServer, type TestServer } from './helpers/server.js';
import { waitFor } from './helpers/wait.js';

const MiB = 1024 * 1024;
const TUS = { 'tus-resumable': '1.0.0' };
const b64 = (s: string) => Buffer.from(s).toString('base64');

type Task = { id: string; status: string; error: { code: string; message: string } | null };
type ErrorBody = { error: { code: string; message: string; details?: Record<string, unknown> } };
type LogLine = Record<string, unknown> & { msg?: string; req?: { id?: unknown } };
/** pino-http binds each request's log lines to the request, id included. */
const requestIdOf = (l: LogLine) => l.req?.id;

describe('internal error text never reaches clients', () => {
  let srv: TestServer;
  const lines: LogLine[] = [];
  const staging = () => path.join(srv.dataDir, 'srs', 'local', '.staging');

  before(async () => {
    const log = new Writable({
      write(chunk, _encoding, done) {
        for (const line of String(chunk).split('\n')) if (line) lines.push(JSON.parse(line));
        done();
      },
    });
    srv = await startServer({ log });
  });
  after(async () => {
    await srv.close();
    await fsp.rm(srv.dataDir, { recursive: true, force: true });
  });

  /** The staging file of session `id`, which the test removes as a failing disk or an operator might. */
  async function stagingFileOf(id: string): Promise<string> {
    const names = (await fsp.readdir(staging())).filter((n) => n.startsWith(`transfer-${id}`));
    assert.equal(names.length, 1, `one staging file for ${id}: ${names}`);
    return path.join(staging(), names[0]);
  }

  /** Nothing of the server's inside (its data directory, the file, an errno) is in what the client read. */
  function assertNothingInternal(text: string, file: string): void {
    for (const secret of [srv.dataDir, path.basename(file), 'ENOENT', 'no such file', '.staging']) {
      assert.ok(!text.includes(secret), `the client read '${secret}' in ${text}`);
    }
  }

  /** The log lines that name the lost file: the details the client did not get. */
  const linesNaming = (file: string) => lines.filter((l) => JSON.stringify(l).includes(file));

  test('a session whose staging file is gone: finalize fails with the generic message, the log has the path', async () => {
    const size = 4 * MiB;
    const vdi = await createVdi(srv.url, size);
    const t = (
      await api<TransferJson>(srv.url, 'POST', '/v1/transfers', {
        vdi: vdi.id,
        direction: 'upload',
        format: 'raw',
        size,
      })
    ).body;
    const put = await fetch(t.url, { method: 'PUT', body: new Uint8Array(seededBytes(size, 3)) });
    assert.equal(put.status, 200, await put.text());
    const file = await stagingFileOf(t.id);
    await fsp.rm(file);

    // The token holder finalizes, waits for the outcome, and reads its session.
    const fin = await fetch(`${srv.url}/v1/transfers/${t.id}/finalize?token=${t.token}&wait=60`, {
      method: 'POST',
    });
    const finText = await fin.text();
    const session = await fetch(`${srv.url}/v1/transfers/${t.id}?token=${t.token}`);
    const sessionText = await session.text();
    for (const text of [finText, sessionText]) assertNothingInternal(text, file);

    // Finalize is accepted and fails in its task: the task says what an error answer would, and the
    // log files the cause under the task's id (the handle the client holds for a background failure).
    assert.equal(fin.status, 202, finText);
    const task = JSON.parse(finText) as Task;
    assert.equal(task.status, 'failure', finText);
    const generic = { code: 'INTERNAL_ERROR', message: INTERNAL_ERROR_MESSAGE };
    assert.deepEqual({ code: task.error?.code, message: task.error?.message }, generic);
    const after = JSON.parse(sessionText) as TransferJson;
    assert.equal(after.state, 'failed');
    assert.deepEqual({ code: after.error?.code, message: after.error?.message }, generic);
    const logged = await waitFor('the cause in the log', () =>
      linesNaming(file).length > 0 ? linesNaming(file) : null,
    );
    assert.ok(
      logged.some((l) => l.task === task.id && l.level === 50),
      `the log files the cause under the task: ${JSON.stringify(logged)}`,
    );
    assert.ok(JSON.stringify(logged).includes('ENOENT'), 'the log keeps the errno');
  });

  test('a tus upload whose staging file is gone: the PATCH with its last byte is a 500 with a request id, nothing more', async () => {
    const data = seededBytes(2 * MiB, 4);
    const vdi = await createVdi(srv.url, data.length);
    const created = await fetch(`${srv.url}/v1/tus/`, {
      method: 'POST',
      headers: {
        ...TUS,
        'upload-length': String(data.length),
        'upload-metadata': `vdi ${b64(vdi.id)},format ${b64('raw')}`,
      },
    });
    assert.equal(created.status, 201);
    const location = new URL(created.headers.get('location')!, srv.url).href;
    const patch = (offset: number, body: Buffer) =>
      fetch(location, {
        method: 'PATCH',
        headers: {
          ...TUS,
          'upload-offset': String(offset),
          'content-type': 'application/offset+octet-stream',
        },
        body: new Uint8Array(body),
      });
    assert.equal((await patch(0, data.subarray(0, MiB))).status, 204);
    const file = await stagingFileOf(location.split('/').pop()!);
    await fsp.rm(file);

    const last = await patch(MiB, data.subarray(MiB));
    const text = await last.text();
    assertNothingInternal(text, file);
    assert.equal(last.status, 500, text);
    const body = JSON.parse(text) as ErrorBody;
    assert.equal(body.error.code, 'INTERNAL_ERROR');
    assert.equal(body.error.message, INTERNAL_ERROR_MESSAGE);
    const requestId = last.headers.get('x-request-id');
    assert.ok(requestId);
    assert.equal(body.error.details?.request_id, requestId);
    await waitFor('the cause in the log', () => linesNaming(file).length > 0);
    assert.ok(
      lines.some((l) => requestIdOf(l) === requestId && l.level === 50),
      'the failed request is logged under the id the client got',
    );
  });

  test('a one-shot PUT whose staging file goes mid-body: a 500 with a request id, and the log has the path', async () => {
    const size = 4 * MiB;
    const vdi = await createVdi(srv.url, size);
    const { port } = new URL(srv.url);
    const req = http.request({
      host: '127.0.0.1',
      port,
      method: 'PUT',
      path: `/v1/vdis/${vdi.id}/contents?format=raw`,
      headers: { 'content-length': String(size) },
    });
    const answered = new Promise<http.IncomingMessage>((resolve, reject) => {
      req.on('response', resolve);
      req.on('error', reject);
    });
    req.write(seededBytes(MiB, 5));
    const id = await waitFor('the one-shot session', async () => {
      const list = await api<TransferJson[]>(srv.url, 'GET', `/v1/transfers?vdi=${vdi.id}`);
      return list.body.find((x) => x.state === 'open')?.id;
    });
    const file = await stagingFileOf(id);
    await fsp.rm(file);
    req.end(seededBytes(size - MiB, 6));
    const res = await answered;
    let text = '';
    for await (const chunk of res) text += chunk;
    assertNothingInternal(text, file);
    assert.equal(res.statusCode, 500, text);
    const body = JSON.parse(text) as ErrorBody;
    assert.equal(body.error.code, 'INTERNAL_ERROR');
    assert.equal(body.error.message, INTERNAL_ERROR_MESSAGE);
    assert.equal(body.error.details?.request_id, res.headers['x-request-id']);
    const logged = await waitFor('the cause in the log', () =>
      linesNaming(file).length > 0 ? linesNaming(file) : null,
    );
    assert.ok(
      logged.some((l) => requestIdOf(l) === res.headers['x-request-id']),
      `the cause is logged under the request id: ${JSON.stringify(logged)}`,
    );
  });
});
