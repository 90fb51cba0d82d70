/** Test servers: in-process (fast, for supertest) and as a real child process (restarts, kill -9). */
import { type ChildProcess, spawn } from 'node:child_process';
import { once } from 'node:events';
import { promises as fsp } from 'node:fs';
import type http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before } from 'node:test';
import { type DestinationStream, pino } from 'pino';
import { createServer } from '../../src/app.js';
import { type Config, parseConfig } from '../../src/config.js';
import { createLogger } from '../../src/http/log-redaction.js';
import { createServices, type Services } from '../../src/services.js';
import { entryArgs } from './entry.js';
import { databaseUrlFor } from './pg.js';

export const ROOT = path.resolve(import.meta.dirname, '../..');

export async function tempDir(prefix = 'diskport-test-'): Promise<string> {
  return fsp.mkdtemp(path.join(os.tmpdir(), prefix));
}

export interface TestServer {
  url: string;
  server: http.Server;
  services: Services;
  dataDir: string;
  close(): Promise<void>;
}

export async function startServer(
  opts: {
    dataDir?: string;
    token?: string;
    allowFetch?: string[];
    config?: Partial<Config>;
    /** Where the server's log goes (at info), as `diskport-server` writes it; silent without. */
    log?: DestinationStream;
    /** The level of `log` (info). */
    logLevel?: string;
  } = {},
): Promise<TestServer> {
  const dataDir = opts.dataDir ?? (await tempDir());
  const config: Config = {
    // Every setting at its default (no environment), then what this test sets.
    ...parseConfig([], {}),
    databaseUrl: databaseUrlFor(dataDir),
    ...opts.config,
    host: '127.0.0.1',
    port: 0,
    dataDir,
    token: opts.token,
    logLevel: 'silent',
    allowFetch: opts.allowFetch ?? [],
  };
  const logger = opts.log ? createLogger(opts.logLevel ?? 'info', opts.log) : pino({ level: 'silent' });
  const services = await createServices(config, logger);
  const server = createServer(services);
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    server,
    services,
    dataDir,
    async close() {
      server.closeAllConnections();
      await new Promise((r) => server.close(r));
      await services.close();
    },
  };
}

export interface ServerProcess {
  url: string;
  child: ChildProcess;
  stop(signal?: NodeJS.Signals): Promise<void>;
}

/** Starts `src/main.ts` as its own process, the way `npm start` runs the built one. */
export async function spawnServer(dataDir: string, extraArgs: string[] = []): Promise<ServerProcess> {
  const databaseUrl = databaseUrlFor(dataDir);
  const child = spawn(
    process.execPath,
    [
      ...entryArgs('main'),
      '--port',
      '0',
      '--data-dir',
      dataDir,
      ...(databaseUrl ? ['--database-url', databaseUrl] : []),
      ...extraArgs,
    ],
    { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let stderr = '';
  child.stderr?.on('data', (d) => {
    stderr += d;
  });
  const url = await new Promise<string>((resolve, reject) => {
    let out = '';
    const onData = (d: Buffer) => {
      out += d;
      const m = /listening on (http:\/\/[\d.]+:\d+)/.exec(out);
      if (m) {
        child.stdout?.off('data', onData);
        child.stdout?.resume();
        resolve(m[1]);
      }
    };
    child.stdout?.on('data', onData);
    child.once('exit', (code) => reject(new Error(`server exited with ${code}: ${stderr}`)));
  });
  return {
    url,
    child,
    async stop(signal: NodeJS.Signals = 'SIGTERM') {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = once(child, 'exit');
      child.kill(signal);
      await exited;
    },
  };
}

/** A spawned server over a data directory that outlives it, for tests that stop or kill it and start it again. */
export interface RestartableServer {
  /** The process serving now: a new one after each restart. */
  readonly server: ServerProcess;
  readonly dataDir: string;
  /** A scratch directory beside it, for the test's own files. */
  readonly work: string;
  /** Stops the server with `signal` (kill -9 by default) and starts another on the same data directory. */
  restart(signal?: NodeJS.Signals): Promise<void>;
}

/**
 * Registers, in the calling suite, the before and after hooks that start a
 * server on a fresh data directory and stop it and remove both directories.
 */
export function restartableServer(): RestartableServer {
  let server: ServerProcess | null = null;
  let dataDir = '';
  let work = '';
  before(async () => {
    dataDir = await tempDir();
    work = await tempDir();
    server = await spawnServer(dataDir);
  });
  after(async () => {
    await server?.stop();
    await fsp.rm(dataDir, { recursive: true, force: true });
    await fsp.rm(work, { recursive: true, force: true });
  });
  return {
    get server() {
      if (!server) throw new Error("the server starts in the suite's before hook");
      return server;
    },
    get dataDir() {
      return dataDir;
    },
    get work() {
      return work;
    },
    async restart(signal: NodeJS.Signals = 'SIGKILL') {
      await server?.stop(signal);
      server = await spawnServer(dataDir);
    },
  };
}

export { prng, seededBytes } from './random.js';
