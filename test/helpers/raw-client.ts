/** A client on a raw socket, for tests of what a server does when its client is slow or leaves. */
import net from 'node:net';
import { waitFor } from './wait.js';

/** A GET on a raw socket that reads only when told: a slow reader, or one that goes away. */
export class RawClient {
  private readonly socket: net.Socket;
  private readonly chunks: Buffer[] = [];
  received = 0;
  private pauseAt = Number.POSITIVE_INFINITY;
  readonly closed: Promise<void>;

  constructor(url: string, pathAndQuery: string, headers: Record<string, string> = {}) {
    const { hostname, port } = new URL(url);
    this.socket = net.connect(Number(port), hostname);
    this.socket.pause();
    const extra = Object.entries(headers)
      .map(([k, v]) => `${k}: ${v}\r\n`)
      .join('');
    this.socket.write(
      `GET ${pathAndQuery} HTTP/1.1\r\nHost: ${hostname}\r\nConnection: close\r\n${extra}\r\n`,
    );
    this.socket.on('data', (c: Buffer) => {
      this.chunks.push(c);
      this.received += c.length;
      // Stop at once, not at the next poll: a fast server sends tens of MiB between two.
      if (this.received >= this.pauseAt) this.socket.pause();
    });
    this.closed = new Promise((resolve) => this.socket.on('close', () => resolve()));
    this.socket.on('error', () => {});
  }

  /** Reads until at least `n` bytes (head included) arrived, then stops reading. */
  async readAtLeast(n: number): Promise<void> {
    this.pauseAt = n;
    this.socket.resume();
    await waitFor(`${n} bytes`, () => this.received >= n);
    this.socket.pause();
  }

  resume(): void {
    this.pauseAt = Number.POSITIVE_INFINITY;
    this.socket.resume();
  }

  destroy(): void {
    this.socket.destroy();
  }

  /** Status line, headers and body, once the server closed the connection. */
  async response(): Promise<{ head: string; body: Buffer }> {
    this.resume();
    await this.closed;
    const all = Buffer.concat(this.chunks);
    const end = all.indexOf('\r\n\r\n');
    return { head: all.subarray(0, end).toString('latin1'), body: all.subarray(end + 4) };
  }
}
