/**
 * The SSRF guard of pull and push, live: a source listens on loopback, and
 * every address form that reaches it (IPv4-compatible, NAT64, 6to4, Teredo,
 * and unique-local space) is refused before any connection, unless
 * --allow-fetch names it. The address rules themselves are tabled in
 * test/unit/ip-ranges.test.ts.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { api, createVdi } from './helpers/api.js';
import { startServer, type TestServer } from './helpers/server.js';

type ErrorBody = { error: { code: string; message: string } };

describe('the SSRF guard, live against a source on loopback', () => {
  let source: http.Server;
  let port: number;
  let connections = 0;
  let srv: TestServer;
  let open: TestServer;
  before(async () => {
    source = http.createServer((_req, res) => res.end('not a disk'));
    source.on('connection', () => {
      connections++;
    });
    source.listen(0, '127.0.0.1');
    await once(source, 'listening');
    port = (source.address() as AddressInfo).port;
    srv = await startServer();
    open = await startServer({ allowFetch: ['127.0.0.0/8'] });
  });
  after(async () => {
    await srv.close();
    await open.close();
    source.closeAllConnections();
    source.close();
  });

  const forms = [
    '[::127.0.0.1]',
    '[::ffff:127.0.0.1]',
    '[64:ff9b::127.0.0.1]',
    '[2002:7f00:1::]',
    '[2001:0:7f00:1::1]',
    '[fd00:ec2::254]',
  ];
  for (const form of forms) {
    test(`pull and push to http://${form}:PORT/ are refused before any connection`, async () => {
      const before = connections;
      const vdi = await createVdi(srv.url, 1024 * 1024);
      const pull = await api<ErrorBody>(srv.url, 'POST', '/v1/transfers', {
        vdi: vdi.id,
        direction: 'upload',
        source_url: `http://${form}:${port}/disk.raw`,
      });
      assert.equal(pull.status, 400);
      assert.equal(pull.body.error.code, 'FETCH_TARGET_FORBIDDEN');
      const push = await api<ErrorBody>(srv.url, 'POST', '/v1/transfers', {
        vdi: vdi.id,
        direction: 'download',
        target_url: `http://${form}:${port}/v1/transfers/x/data?token=y`,
      });
      assert.equal(push.status, 400);
      assert.equal(push.body.error.code, 'FETCH_TARGET_FORBIDDEN');
      assert.equal(connections, before, 'the source saw no connection');
    });
  }

  test('with --allow-fetch 127.0.0.0/8 the mapped form does reach the source (the test can see a connection)', async () => {
    const before = connections;
    const vdi = await createVdi(open.url, 1024 * 1024);
    const pull = await api<{ id: string; task_id: string }>(open.url, 'POST', '/v1/transfers', {
      vdi: vdi.id,
      direction: 'upload',
      source_url: `http://[::ffff:127.0.0.1]:${port}/disk.raw`,
    });
    assert.equal(pull.status, 201);
    await api(open.url, 'GET', `/v1/tasks/${pull.body.task_id}?wait=30`);
    assert.ok(connections > before, 'the pull connected to the source');
  });
});
