/** A TCP proxy for tests of broken links: it counts what it forwards and cuts connections on demand. */
import { once } from 'node:events';
import type { AddressInfo } from 'node:net';
import net from 'node:net';
import { prng } from './random.js';

export interface CutProxy {
  url: string;
  /** Bytes forwarded client → server. */
  bytesUp: number;
  bytesDown: number;
  cuts: number;
  /** The link goes down: open connections are cut, new ones reset at once, until `up()`. */
  down(): void;
  /** The link goes down by itself once this many bytes (both ways) have crossed it. */
  downAt?: number;
  up(): void;
  close(): Promise<void>;
}

/**
 * A TCP proxy that cuts each of its first `cutConnections` connections after
 * a seeded random number of bytes in one direction.
 */
export async function cutProxy(
  target: string,
  opts: {
    seed: number;
    cutConnections: number;
    direction: 'up' | 'down';
    minBytes: number;
    maxBytes: number;
  },
): Promise<CutProxy> {
  const { hostname, port } = new URL(target);
  const rnd = prng(opts.seed);
  let connections = 0;
  let isDown = false;
  const sockets = new Set<net.Socket>();
  const state: CutProxy = {
    url: '',
    bytesUp: 0,
    bytesDown: 0,
    cuts: 0,
    down() {
      isDown = true;
      for (const s of sockets) s.destroy();
    },
    up() {
      isDown = false;
    },
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise((r) => server.close(r));
    },
  };
  const server = net.createServer((client) => {
    if (isDown) {
      client.resetAndDestroy();
      return;
    }
    const index = connections++;
    let budget =
      index < opts.cutConnections
        ? Math.floor(opts.minBytes + rnd() * (opts.maxBytes - opts.minBytes))
        : Number.POSITIVE_INFINITY;
    const upstream = net.connect(Number(port), hostname);
    sockets.add(client).add(upstream);
    const kill = () => {
      client.destroy();
      upstream.destroy();
    };
    const pipe = (from: net.Socket, to: net.Socket, up: boolean) => {
      from.on('data', (buf: Buffer) => {
        let out = buf;
        const cutting = (opts.direction === 'up') === up;
        if (cutting && out.length >= budget) {
          out = out.subarray(0, budget);
          budget = 0;
        } else if (cutting) budget -= out.length;
        if (up) state.bytesUp += out.length;
        else state.bytesDown += out.length;
        if (state.downAt !== undefined && state.bytesUp + state.bytesDown >= state.downAt) {
          state.downAt = undefined;
          state.down();
          return;
        }
        if (out.length && !to.write(out)) {
          from.pause();
          to.once('drain', () => from.resume());
        }
        if (cutting && budget === 0) {
          state.cuts++;
          // The sender's side breaks; the other side gets what was forwarded, then end of stream.
          from.destroy();
          to.end();
          setTimeout(kill, 2000).unref();
        }
      });
      from.on('end', () => to.end());
      from.on('error', kill);
      from.on('close', () => sockets.delete(from));
    };
    pipe(client, upstream, true);
    pipe(upstream, client, false);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  state.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  return state;
}
