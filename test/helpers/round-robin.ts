/**
 * A load balancer for tests of several nodes: each request goes to the next
 * node in turn (no affinity, as nginx's default round-robin), its body and
 * answer piped through. It records where each request went.
 */
import { once } from 'node:events';
import http from 'node:http';
import type { AddressInfo } from 'node:net';

export interface RoundRobin {
  url: string;
  /** The node (its URL) each request was sent to, in order. */
  sentTo: string[];
  /** Nodes taken out of the turn (a node killed: nginx marks it down after a failure). */
  remove(target: string): void;
  close(): Promise<void>;
}

const HOP_BY_HOP = new Set([
  'connection',
  'keep-alive',
  'transfer-encoding',
  'upgrade',
  'expect',
  'te',
  'trailer',
]);

export async function roundRobin(targets: string[]): Promise<RoundRobin> {
  const live = [...targets];
  let next = 0;
  const sentTo: string[] = [];
  const agent = new http.Agent({ keepAlive: true });
  const server = http.createServer((req, res) => {
    const target = live[next++ % live.length];
    sentTo.push(target);
    const headers: http.OutgoingHttpHeaders = {};
    for (const [k, v] of Object.entries(req.headers))
      if (!HOP_BY_HOP.has(k) && v !== undefined) headers[k] = v;
    const out = http.request(new URL(req.url ?? '/', target), { method: req.method, headers, agent });
    out.on('response', (answer) => {
      const back: http.OutgoingHttpHeaders = {};
      for (const [k, v] of Object.entries(answer.headers))
        if (!HOP_BY_HOP.has(k) && v !== undefined) back[k] = v;
      res.writeHead(answer.statusCode ?? 502, back);
      answer.pipe(res);
    });
    out.on('error', () => {
      if (res.headersSent) res.destroy();
      else res.writeHead(502).end();
    });
    req.pipe(out);
  });
  server.on('checkContinue', (req, res) => {
    res.writeContinue();
    server.emit('request', req, res);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    sentTo,
    remove(target) {
      const i = live.indexOf(target);
      if (i >= 0) live.splice(i, 1);
    },
    async close() {
      server.closeAllConnections();
      server.close();
      agent.destroy();
    },
  };
}
