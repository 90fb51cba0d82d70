/**
 * Connections as a hostile or broken client leaves them: sockets that never
 * send a byte are closed, headers that trickle in are cut off, past
 * --max-connections requests get 503, and /healthz stays fast with 2,000
 * idle sockets open. Real sockets; the timeouts are made small for the test.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import http from 'node:http';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { startServer, type TestServer } from './helpers/server.js';

function portOf(srv: TestServer): number {
  return Number(new URL(srv.url).port);
}

/** Opens `n` sockets that send nothing, a batch at a time (the listen backlog is finite). */
async function idleSockets(srv: TestServer, n: number, batch = 200): Promise<net.Socket[]> {
  const sockets: net.Socket[] = [];
  for (let i = 0; i < n; i += batch) {
    const opened = Array.from({ length: Math.min(batch, n - i) }, () => {
      const s = net.connect(portOf(srv), '127.0.0.1');
      s.on('error', () => {});
      return s;
    });
    await Promise.all(opened.map((s) => once(s, 'connect')));
    sockets.push(...opened);
  }
  return sockets;
}

function serverConnections(srv: TestServer): Promise<number> {
  return new Promise((resolve, reject) =>
    srv.server.getConnections((err, n) => (err ? reject(err) : resolve(n))),
  );
}

/** Polls `check` until it holds or `timeoutMs` passes; returns whether it held. */
async function eventually(check: () => boolean | Promise<boolean>, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (await check()) return true;
    await sleep(25);
  }
  return check();
}

/** GET on a connection of its own; resolves with the status, body and how long it took. */
function getAlone(
  srv: TestServer,
  path: string,
): Promise<{ status: number; body: string; ms: number; headers: http.IncomingHttpHeaders }> {
  const started = performance.now();
  return new Promise((resolve, reject) => {
    const req = http.get(`${srv.url}${path}`, { agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c) => {
        body += c;
      });
      res.on('end', () =>
        resolve({ status: res.statusCode ?? 0, body, ms: performance.now() - started, headers: res.headers }),
      );
    });
    req.on('error', reject);
  });
}

describe('connections that send nothing, or too little', () => {
  let srv: TestServer;
  before(async () => {
    srv = await startServer({ config: { firstRequestTimeoutMs: 300, headersTimeoutMs: 10_000 } });
  });
  after(() => srv.close());

  test('sockets that never send a byte are closed after --first-request-timeout', async () => {
    const sockets = await idleSockets(srv, 50);
    const closed = new Set<net.Socket>();
    for (const s of sockets) s.on('close', () => closed.add(s));
    const started = Date.now();
    assert.ok(
      await eventually(() => closed.size === sockets.length, 10_000),
      `${sockets.length - closed.size} of ${sockets.length} idle sockets still open after 10 s`,
    );
    assert.ok(Date.now() - started >= 200, 'not closed before the timeout');
    assert.ok(await eventually(async () => (await serverConnections(srv)) === 0, 5000));
  });

  test('a connection whose request has arrived is not cut by that timeout, nor between keep-alive requests', async () => {
    const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    try {
      const get = () =>
        new Promise<{ status: number; reused: boolean }>((resolve, reject) => {
          const req = http.get(`${srv.url}/healthz`, { agent }, (res) => {
            res.resume();
            res.on('end', () => resolve({ status: res.statusCode ?? 0, reused: req.reusedSocket }));
          });
          req.on('error', reject);
        });
      assert.equal((await get()).status, 200);
      await sleep(600); // twice the first-request timeout: what is under test is that nothing fires
      const second = await get();
      assert.equal(second.status, 200);
      assert.equal(second.reused, true, 'the same connection served the second request');
    } finally {
      agent.destroy();
    }

    // An upload whose body starts after a silence longer than the timeout.
    const vdi = (await (
      await fetch(`${srv.url}/v1/vdis`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ name_label: 'slow', virtual_size: 1024 * 1024 }),
      })
    ).json()) as { id: string };
    const socket = net.connect(portOf(srv), '127.0.0.1');
    await once(socket, 'connect');
    let answer = '';
    socket.on('data', (c) => {
      answer += c;
    });
    socket.write(
      `PUT /v1/vdis/${vdi.id}/contents?format=raw HTTP/1.1\r\nHost: x\r\nContent-Length: 4096\r\n\r\n`,
    );
    await sleep(600);
    socket.write(Buffer.alloc(4096, 7));
    assert.ok(await eventually(() => answer.includes('\r\n\r\n'), 10_000), 'an answer came');
    socket.destroy();
    assert.match(answer, /^HTTP\/1\.1 200 /);
  });
});

describe('a request whose headers trickle in', () => {
  let srv: TestServer;
  before(async () => {
    srv = await startServer({ config: { headersTimeoutMs: 500, firstRequestTimeoutMs: 30_000 } });
  });
  after(() => srv.close());

  test('is answered 408 and closed after --headers-timeout, however often it sends a byte', async () => {
    const socket = net.connect(portOf(srv), '127.0.0.1');
    await once(socket, 'connect');
    let answer = '';
    socket.on('data', (c) => {
      answer += c;
    });
    let closed = false;
    socket.on('close', () => {
      closed = true;
    });
    socket.on('error', () => {});
    socket.write('GET /healthz HTTP/1.1\r\n');
    const started = Date.now();
    for (let i = 0; !closed && Date.now() - started < 10_000; i++) {
      socket.write(`X-Drip-${i}: a\r\n`);
      await sleep(100);
    }
    assert.ok(closed, 'still open after 10 s of drip-fed headers');
    assert.match(answer, /^HTTP\/1\.1 408 /);
  });
});

describe('--max-connections', () => {
  let srv: TestServer;
  before(async () => {
    srv = await startServer({ config: { maxConnections: 10, firstRequestTimeoutMs: 30_000 } });
  });
  after(() => srv.close());

  test('past the limit a request gets 503 JSON with Retry-After; once connections close, it is served', async () => {
    const sockets = await idleSockets(srv, 10);
    assert.ok(await eventually(async () => (await serverConnections(srv)) === 10, 5000));
    const refused = await getAlone(srv, '/healthz');
    assert.equal(refused.status, 503);
    assert.equal(refused.headers['retry-after'], '1');
    assert.equal(refused.headers.connection, 'close');
    const body = JSON.parse(refused.body) as { error: { code: string; message: string } };
    assert.equal(body.error.code, 'TOO_MANY_CONNECTIONS');
    assert.match(body.error.message, /10 connections/);

    for (const s of sockets.slice(0, 3)) s.destroy();
    assert.ok(
      await eventually(async () => (await getAlone(srv, '/healthz')).status === 200, 5000),
      'served again once connections closed',
    );
    for (const s of sockets) s.destroy();
  });
});

describe('2,000 idle sockets', () => {
  let srv: TestServer;
  before(async () => {
    srv = await startServer();
  });
  after(() => srv.close());

  test('/healthz still answers within 100 ms', async () => {
    const sockets = await idleSockets(srv, 2000);
    try {
      assert.ok(await eventually(async () => (await serverConnections(srv)) >= 2000, 10_000));
      const times: number[] = [];
      for (let i = 0; i < 7; i++) {
        const res = await getAlone(srv, '/healthz');
        assert.equal(res.status, 200);
        times.push(res.ms);
      }
      times.sort((a, b) => a - b);
      const median = times[Math.floor(times.length / 2)];
      assert.ok(
        median < 100,
        `median /healthz ${median.toFixed(1)} ms (all: ${times.map((t) => t.toFixed(1)).join(', ')})`,
      );
      assert.equal(sockets.filter((s) => s.destroyed).length, 0, 'the idle sockets are within the limits');
    } finally {
      for (const s of sockets) s.destroy();
    }
  });
});
