/**
 * Secrets never reach the log: with --token, every way a client sends a
 * credential (bearer token, Basic password, xapi's session_id, a transfer's
 * ?token=, a URL quoted back in a refusal) is replaced in what the server
 * writes, while the requests themselves stay in the log.
 */
import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import { after, before, describe, test } from 'node:test';
import { redactSecrets } from '../src/http/log-redaction.js';
import { api } from './helpers/api.js';
import { startServer, type TestServer } from './helpers/server.js';

const MiB = 1024 * 1024;
const TOKEN = 'mgmt-secret-7c1d9e';
const WRONG_BEARER = 'wrong-bearer-4f2a61';
const WRONG_SESSION = 'OpaqueRef:wrong-session-8b3e02';
const PUSH_SECRET = 'push-token-5d90aa';

describe('the log with --token', () => {
  let srv: TestServer;
  const lines: string[] = [];
  const secrets: string[] = [TOKEN, WRONG_BEARER, WRONG_SESSION, PUSH_SECRET];
  const auth = { authorization: `Bearer ${TOKEN}` };

  before(async () => {
    const log = new Writable({
      write(chunk: Buffer, _enc, done) {
        lines.push(...chunk.toString().split('\n').filter(Boolean));
        done();
      },
    });
    srv = await startServer({ token: TOKEN, log });
  });
  after(() => srv.close());

  test('holds the requests and none of their credentials', async () => {
    assert.equal((await api(srv.url, 'GET', '/v1/vdis', undefined, auth)).status, 200);
    assert.equal(
      (await api(srv.url, 'GET', '/v1/vdis', undefined, { authorization: `Bearer ${WRONG_BEARER}` })).status,
      403,
    );
    const vdi = await api<{ id: string }>(
      srv.url,
      'POST',
      '/v1/vdis',
      { name_label: 'logged', virtual_size: MiB },
      auth,
    );
    const id = vdi.body.id;

    // xapi: session_id in the query, Basic credentials, a wrong session.
    assert.equal((await fetch(`${srv.url}/export_raw_vdi?vdi=${id}&session_id=${TOKEN}`)).status, 200);
    const basic = Buffer.from(`root:${TOKEN}`).toString('base64');
    secrets.push(basic);
    const viaBasic = await fetch(`${srv.url}/export_raw_vdi?vdi=${id}`, {
      headers: { authorization: `Basic ${basic}` },
    });
    assert.equal(viaBasic.status, 200);
    await viaBasic.arrayBuffer();
    assert.equal(
      (await fetch(`${srv.url}/export_raw_vdi?session_id=${encodeURIComponent(WRONG_SESSION)}&vdi=${id}`))
        .status,
      403,
    );

    // A transfer's token in its url, accepted and refused.
    const open = await api<{ id: string; url: string; token: string }>(
      srv.url,
      'POST',
      '/v1/transfers',
      { vdi: id, direction: 'upload', size: MiB },
      auth,
    );
    assert.equal(open.status, 201);
    secrets.push(open.body.token);
    const put = await fetch(open.body.url, {
      method: 'PUT',
      headers: { 'content-range': `bytes 0-${MiB - 1}/${MiB}` },
      body: Buffer.alloc(MiB, 3),
    });
    assert.equal(put.status, 200, await put.text());
    assert.equal((await fetch(open.body.url, { method: 'HEAD' })).status, 200);
    const refused = await fetch(open.body.url, {
      method: 'PUT',
      headers: { 'content-range': 'bytes 9-1/10' },
      body: 'x',
    });
    assert.equal(refused.status, 400);
    const finalize = await fetch(
      `${srv.url}/v1/transfers/${open.body.id}/finalize?token=${open.body.token}&wait=30`,
      { method: 'POST' },
    );
    assert.equal(finalize.status, 202);

    // A refusal whose message quotes the URL it was given, token and all.
    const push = await api<{ error: { code: string; message: string } }>(
      srv.url,
      'POST',
      '/v1/transfers',
      { vdi: id, direction: 'download', target_url: `http://[bad/v1/transfers/x/data?token=${PUSH_SECRET}` },
      auth,
    );
    assert.equal(push.status, 400);
    assert.equal(push.body.error.code, 'INVALID_URL');

    const text = lines.join('\n');
    for (const path of ['/v1/vdis', '/export_raw_vdi', `/v1/transfers/${open.body.id}/data`, 'INVALID_URL']) {
      assert.ok(text.includes(path), `the log records ${path}`);
    }
    assert.ok(text.includes('[REDACTED]'), 'credentials are replaced, visibly');
    for (const secret of secrets) {
      const at = lines.find((l) => l.includes(secret));
      assert.equal(at, undefined, `a secret reached the log: ${at}`);
    }
  });
});

test('redactSecrets replaces query credentials, URL userinfo and Authorization values, and nothing else', () => {
  for (const [text, expected] of [
    ['/v1/transfers/a/data?token=abc&x=1', '/v1/transfers/a/data?token=[REDACTED]&x=1'],
    ['/export_raw_vdi?vdi=v&session_id=OpaqueRef:1-2', '/export_raw_vdi?vdi=v&session_id=[REDACTED]'],
    ['/x?TOKEN=a;Session_Id=b', '/x?TOKEN=[REDACTED];Session_Id=[REDACTED]'],
    ['https://s3/x?X-Amz-Signature=f00&X-Amz-Date=1', 'https://s3/x?X-Amz-Signature=[REDACTED]&X-Amz-Date=1'],
    [
      "target_url is not a URL: 'http://u:p@h/p?token=t'",
      "target_url is not a URL: 'http://[REDACTED]@h/p?token=[REDACTED]'",
    ],
    ['Bearer abc.def and Basic cm9vdDpw', 'Bearer [REDACTED] and Basic [REDACTED]'],
    ['/v1/vdis?tokens=1&mytoken=2', '/v1/vdis?tokens=1&mytoken=2'],
  ]) {
    assert.equal(redactSecrets(text), expected);
  }
});
