/**
 * Settings: every one has a CLI flag and an environment variable; flags win.
 */
import { isIP } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Command, InvalidArgumentError } from 'commander';
import { VERSION } from './version.js';

export interface Config {
  host: string;
  port: number;
  dataDir: string;
  /** `postgres://…`: the metadata lives in that PostgreSQL database instead of SQLite in dataDir. */
  databaseUrl?: string;
  token?: string;
  logLevel: string;
  /** CIDRs (or `*`) that pull and push may reach although the SSRF guard forbids them (see transfer/ip-ranges.ts). */
  allowFetch: string[];
  /** Finished tasks are kept this long, and at most this many, then pruned. */
  taskRetention: { maxAgeSeconds: number; maxCount: number };
  /** Connections open at once; past it, requests are answered 503. */
  maxConnections: number;
  /** A connection that sends no request this long after it opened is closed. */
  firstRequestTimeoutMs: number;
  /** A request whose headers take longer than this to arrive is answered 408 and closed. */
  headersTimeoutMs: number;
  /** Bytes kept free on each SR for the metadata store: data writes that would eat into them are refused (507). */
  spaceReserveBytes: number;
  /** SRs beside the default `local` one (`--sr NAME=PATH[:formats]`, repeatable). */
  srs: SrConfig[];
  /** A Unix socket that serves ovirt-imageio's /images/ API too, for clients on this host. */
  imageioSocket?: string;
  /** A raw chain at rest deeper than this (layers read through) is flattened at the limit in the background. */
  maxChainDepth: number;
  /**
   * The URL other diskports reach this one at, as receive tokens advertise it
   * (behind a proxy or NAT the Host header a client used is not it); unset,
   * the request's own scheme and Host.
   */
  publicUrl?: string;
  /**
   * The URL the other nodes sharing the database reach this one at: a request
   * for a session this node holds is forwarded there. Default: the listening
   * address (a wildcard host replaced by this machine's hostname).
   */
  nodeUrl?: string;
  /** How often this node records that it is alive (and renews its leases) in the metadata store. */
  heartbeatMs: number;
  /** A node whose heartbeat is older than this is dead: its leases and tasks are taken over. */
  nodeTimeoutMs: number;
}

/** One configured SR: its id, its directory, and the image formats it stores (the first is its default). */
export interface SrConfig {
  id: string;
  path: string;
  formats: string[];
}

/** What `--sr` may name an SR: a short id that is safe in URLs; `local` is the built-in one. */
const SR_ID = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;
const SR_FORMATS = ['raw', 'vhd', 'qcow2'];

/**
 * `--sr NAME=PATH[:FORMAT,FORMAT...]`, e.g. `fast=/mnt/ssd/diskport:qcow2,raw`:
 * an SR named NAME in directory PATH storing the formats listed (default: all;
 * the first listed is its default format). The last `:` splits the formats
 * off only when what follows is a list of formats, so a path may hold a colon.
 */
export function parseSrSpec(value: string): SrConfig {
  const eq = value.indexOf('=');
  if (eq < 1)
    throw new InvalidArgumentError(`'${value}' is not NAME=PATH[:formats] (e.g. fast=/mnt/ssd:qcow2,raw)`);
  const id = value.slice(0, eq);
  let dir = value.slice(eq + 1);
  let formats = [...SR_FORMATS];
  const colon = dir.lastIndexOf(':');
  if (colon >= 0 && /^[a-z0-9]+(,[a-z0-9]+)*$/.test(dir.slice(colon + 1))) {
    formats = dir.slice(colon + 1).split(',');
    dir = dir.slice(0, colon);
  }
  if (!SR_ID.test(id) || id === 'local') {
    throw new InvalidArgumentError(
      `SR name '${id}' must be 1-64 letters, digits, '_' or '-' and not 'local' (the built-in SR)`,
    );
  }
  if (!dir) throw new InvalidArgumentError(`SR '${id}' names no directory (NAME=PATH[:formats])`);
  const unknown = formats.filter((f) => !SR_FORMATS.includes(f));
  if (unknown.length) {
    throw new InvalidArgumentError(
      `SR '${id}': unknown image format(s) ${unknown.join(', ')}; use ${SR_FORMATS.join(', ')}`,
    );
  }
  return { id, path: path.resolve(dir), formats: [...new Set(formats)] };
}

function envSrs(program: Command, value: string): SrConfig[] {
  try {
    return parseSrList(value);
  } catch (err) {
    // Reported like a bad flag: one line on stderr, exit status 1.
    return program.error(`error: DISKPORT_SRS: ${(err as Error).message}`);
  }
}

/** `--public-url https://dr.example:8080`: an http(s) URL, kept without a trailing slash. */
export function parsePublicUrl(value: string): string {
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    throw new InvalidArgumentError(`'${value}' is not a URL (e.g. https://diskport.example:8080)`);
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') {
    throw new InvalidArgumentError(`'${value}' is not an http or https URL`);
  }
  if (url.search || url.hash || url.username || url.password) {
    throw new InvalidArgumentError(`'${value}' must not carry a query, fragment or credentials`);
  }
  return url.toString().replace(/\/+$/, '');
}

/** An http(s) URL from the environment variable `name`, or the same error as its flag's. */
function envUrl(program: Command, name: string, value: string | undefined): string | undefined {
  if (!value) return undefined;
  try {
    return parsePublicUrl(value);
  } catch (err) {
    return program.error(`error: ${name}: ${(err as Error).message}`);
  }
}

/** DISKPORT_SRS: `--sr` specs separated by `;`. */
export function parseSrList(value: string): SrConfig[] {
  return value
    .split(';')
    .map((v) => v.trim())
    .filter(Boolean)
    .reduce<SrConfig[]>((prev, v) => collectSr(v, prev), []);
}

function collectSr(value: string, previous: SrConfig[]): SrConfig[] {
  const sr = parseSrSpec(value);
  if (previous.some((p) => p.id === sr.id)) throw new InvalidArgumentError(`SR '${sr.id}' is given twice`);
  return [...previous, sr];
}

export const DEFAULTS = {
  host: '127.0.0.1',
  port: 8080,
  dataDir: './data',
  logLevel: 'info',
  taskRetention: '7d',
  taskRetentionCount: 10_000,
  maxConnections: 4096,
  firstRequestTimeout: '30s',
  headersTimeout: '60s',
  spaceReserve: '32M',
  maxChainDepth: 16,
  heartbeat: '2s',
  nodeTimeout: '10s',
} as const;

const DURATION_UNITS_SECONDS: Record<string, number> = { s: 1, m: 60, h: 3600, d: 86_400 };

/** `7d`, `12h`, `30m`, `90s` or a bare number of seconds. */
export function parseDuration(value: string): number {
  const m = /^(\d+)([smhd]?)$/.exec(value.trim());
  if (!m) throw new InvalidArgumentError(`'${value}' is not a duration (e.g. 7d, 12h, 30m, 90s)`);
  return Number(m[1]) * DURATION_UNITS_SECONDS[m[2] || 's'];
}

/** `30s`, `500ms`, `2m` or a bare number of seconds, in milliseconds; never 0 (that would mean no limit). */
export function parseDurationMs(value: string): number {
  const m = /^(\d+)ms$/.exec(value.trim());
  const ms = m ? Number(m[1]) : parseDuration(value) * 1000;
  if (ms <= 0) throw new InvalidArgumentError(`'${value}' must be longer than 0`);
  return ms;
}

const SIZE_UNITS_BYTES: Record<string, number> = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3 };

/** `32M`, `1G`, `512K` (binary units) or a bare number of bytes. */
export function parseSize(value: string): number {
  const m = /^(\d+)([KMG]?)(?:i?B)?$/i.exec(value.trim());
  if (!m) throw new InvalidArgumentError(`'${value}' is not a size (e.g. 32M, 1G, or bytes)`);
  return Number(m[1]) * SIZE_UNITS_BYTES[m[2].toUpperCase()];
}

function parseCount(value: string): number {
  if (!/^\d+$/.test(value.trim())) throw new InvalidArgumentError(`'${value}' is not a whole number`);
  return Number(value);
}

/** A chain depth limit: 2 or more (a limit of 1 would copy the whole disk at every commit after a snapshot). */
function parseChainDepth(value: string): number {
  const n = parseCount(value);
  if (n < 2) throw new InvalidArgumentError(`'${value}' must be 2 or more`);
  return n;
}

function parsePositiveCount(value: string): number {
  const n = parseCount(value);
  if (n < 1) throw new InvalidArgumentError(`'${value}' must be 1 or more`);
  return n;
}

/** `--allow-fetch 127.0.0.0/8,::1`: comma-separated CIDRs or bare addresses, or `*` for any. */
export function parseAllowFetch(value: string): string[] {
  const list = value
    .split(',')
    .map((v) => v.trim())
    .filter(Boolean);
  for (const item of list) {
    if (item === '*') continue;
    const [addr, prefix, extra] = item.split('/');
    const family = isIP(addr);
    const bits = family === 4 ? 32 : 128;
    if (
      !family ||
      extra !== undefined ||
      (prefix !== undefined && !(/^\d+$/.test(prefix) && Number(prefix) <= bits))
    ) {
      throw new InvalidArgumentError(`'${item}' is not a CIDR (e.g. 127.0.0.0/8, fe80::/10) nor '*'`);
    }
  }
  return list;
}

function parsePort(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0 || n > 65535)
    throw new InvalidArgumentError('must be a port number 0..65535');
  return n;
}

export function parseConfig(argv: string[], env: NodeJS.ProcessEnv = process.env): Config {
  const program = new Command('diskport-server')
    .description('HTTP service that imports and exports virtual disk images (raw, vhd, qcow2)')
    .version(VERSION)
    .option('--host <host>', 'address to listen on (env DISKPORT_HOST)', env.DISKPORT_HOST ?? DEFAULTS.host)
    .option(
      '--port <port>',
      'port to listen on (env DISKPORT_PORT)',
      parsePort,
      env.DISKPORT_PORT ? parsePort(env.DISKPORT_PORT) : DEFAULTS.port,
    )
    .option(
      '--data-dir <dir>',
      'where metadata and the local SR live (env DISKPORT_DATA_DIR)',
      env.DISKPORT_DATA_DIR ?? DEFAULTS.dataDir,
    )
    .option(
      '--database-url <url>',
      'keep the metadata in this PostgreSQL database (postgres://user:password@host/db) instead of SQLite in the data directory (env DISKPORT_DATABASE_URL)',
    )
    .option('--token <token>', 'bearer token for management calls (env DISKPORT_TOKEN)')
    .option('--log-level <level>', 'pino log level (env LOG_LEVEL)', env.LOG_LEVEL ?? DEFAULTS.logLevel)
    .option(
      '--allow-fetch <cidr,...>',
      'addresses pull/push may reach despite the SSRF guard (loopback, link-local, unique-local, ...): CIDRs or * (env DISKPORT_ALLOW_FETCH)',
      parseAllowFetch,
      env.DISKPORT_ALLOW_FETCH ? parseAllowFetch(env.DISKPORT_ALLOW_FETCH) : [],
    )
    .option(
      '--task-retention <duration>',
      'how long finished tasks are kept, e.g. 7d, 12h (env DISKPORT_TASK_RETENTION)',
      parseDuration,
      parseDuration(env.DISKPORT_TASK_RETENTION ?? DEFAULTS.taskRetention),
    )
    .option(
      '--task-retention-count <n>',
      'how many finished tasks are kept at most (env DISKPORT_TASK_RETENTION_COUNT)',
      parseCount,
      env.DISKPORT_TASK_RETENTION_COUNT
        ? parseCount(env.DISKPORT_TASK_RETENTION_COUNT)
        : DEFAULTS.taskRetentionCount,
    )
    .option(
      '--max-connections <n>',
      'connections open at once; past it, requests get 503 (env DISKPORT_MAX_CONNECTIONS)',
      parsePositiveCount,
      parsePositiveCount(env.DISKPORT_MAX_CONNECTIONS ?? String(DEFAULTS.maxConnections)),
    )
    .option(
      '--first-request-timeout <duration>',
      'a connection that sends no request for this long after opening is closed, e.g. 30s, 500ms (env DISKPORT_FIRST_REQUEST_TIMEOUT)',
      parseDurationMs,
      parseDurationMs(env.DISKPORT_FIRST_REQUEST_TIMEOUT ?? DEFAULTS.firstRequestTimeout),
    )
    .option(
      '--headers-timeout <duration>',
      "a request's headers must all arrive within this, e.g. 60s (env DISKPORT_HEADERS_TIMEOUT)",
      parseDurationMs,
      parseDurationMs(env.DISKPORT_HEADERS_TIMEOUT ?? DEFAULTS.headersTimeout),
    )
    .option(
      '--space-reserve <size>',
      "space kept free on each SR for diskport's metadata, e.g. 32M, 1G (env DISKPORT_SPACE_RESERVE)",
      parseSize,
      parseSize(env.DISKPORT_SPACE_RESERVE ?? DEFAULTS.spaceReserve),
    )
    .option(
      '--sr <name=path[:formats]>',
      'another SR: its name, directory and image formats (default all; the first is its default), e.g. fast=/mnt/ssd:qcow2,raw; repeatable (env DISKPORT_SRS, specs separated by ;)',
      collectSr,
      [],
    )
    .option(
      '--imageio-socket <path>',
      "also serve ovirt-imageio's /images/ API on this Unix socket, for local clients (env DISKPORT_IMAGEIO_SOCKET)",
    )
    .option(
      '--max-chain-depth <n>',
      'layers a raw chain at rest may have (2 or more); a deeper one is flattened at the limit in the background (env DISKPORT_MAX_CHAIN_DEPTH)',
      parseChainDepth,
      parseChainDepth(env.DISKPORT_MAX_CHAIN_DEPTH ?? String(DEFAULTS.maxChainDepth)),
    )
    .option(
      '--public-url <url>',
      "this diskport's URL as other diskports reach it, advertised in receive tokens (env DISKPORT_PUBLIC_URL; default: the request's scheme and Host)",
      parsePublicUrl,
    )
    .option(
      '--node-url <url>',
      "the URL other nodes sharing the database reach this node at, where they forward requests for the upload sessions it holds (env DISKPORT_NODE_URL; default: the listening address, a wildcard host replaced by this machine's hostname)",
      parsePublicUrl,
    )
    .option(
      '--heartbeat <duration>',
      'how often this node records in the metadata store that it is alive, e.g. 2s, 500ms (env DISKPORT_HEARTBEAT)',
      parseDurationMs,
      parseDurationMs(env.DISKPORT_HEARTBEAT ?? DEFAULTS.heartbeat),
    )
    .option(
      '--node-timeout <duration>',
      'a node silent this long is dead and other nodes take over its writes and tasks, e.g. 10s (env DISKPORT_NODE_TIMEOUT)',
      parseDurationMs,
      parseDurationMs(env.DISKPORT_NODE_TIMEOUT ?? DEFAULTS.nodeTimeout),
    )
    .exitOverride();
  program.parse(argv, { from: 'user' });
  const o = program.opts<
    Config & {
      taskRetention: number;
      taskRetentionCount: number;
      firstRequestTimeout: number;
      sr: SrConfig[];
      headersTimeout: number;
      spaceReserve: number;
      heartbeat: number;
      nodeTimeout: number;
    }
  >();
  if (o.nodeTimeout < 2 * o.heartbeat) {
    program.error(
      `error: --node-timeout (${o.nodeTimeout} ms) must be at least twice --heartbeat (${o.heartbeat} ms): a live node would be taken for dead between two heartbeats`,
    );
  }
  return {
    host: o.host,
    port: o.port,
    dataDir: path.resolve(o.dataDir),
    // not a commander default either: --help would print its password
    databaseUrl: o.databaseUrl || env.DISKPORT_DATABASE_URL || undefined,
    // not a commander default: --help would print the secret
    token: o.token || env.DISKPORT_TOKEN || undefined,
    logLevel: o.logLevel,
    allowFetch: o.allowFetch,
    taskRetention: { maxAgeSeconds: o.taskRetention, maxCount: o.taskRetentionCount },
    maxConnections: o.maxConnections,
    firstRequestTimeoutMs: o.firstRequestTimeout,
    headersTimeoutMs: o.headersTimeout,
    spaceReserveBytes: o.spaceReserve,
    // Flags win: any --sr replaces the whole DISKPORT_SRS list.
    srs: o.sr.length ? o.sr : envSrs(program, env.DISKPORT_SRS ?? ''),
    imageioSocket:
      o.imageioSocket || env.DISKPORT_IMAGEIO_SOCKET
        ? path.resolve(o.imageioSocket || env.DISKPORT_IMAGEIO_SOCKET!)
        : undefined,
    maxChainDepth: o.maxChainDepth,
    publicUrl: o.publicUrl ?? envUrl(program, 'DISKPORT_PUBLIC_URL', env.DISKPORT_PUBLIC_URL),
    nodeUrl: o.nodeUrl ?? envUrl(program, 'DISKPORT_NODE_URL', env.DISKPORT_NODE_URL),
    heartbeatMs: o.heartbeat,
    nodeTimeoutMs: o.nodeTimeout,
  };
}

/**
 * The URL other nodes reach a node listening on `host`:`port` at: a wildcard
 * host says nothing to another machine, this machine's hostname does.
 */
export function nodeUrlOf(host: string, port: number, hostname = os.hostname()): string {
  const reachable = host === '0.0.0.0' || host === '::' || host === '' ? hostname : host;
  return `http://${reachable.includes(':') ? `[${reachable}]` : reachable}:${port}`;
}

/** Loopback addresses are the only ones that may be served without a token. */
export function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || host.startsWith('127.');
}

export function checkListenPolicy(config: Config): string | null {
  if (config.token || isLoopback(config.host)) return null;
  return (
    `refusing to listen on ${config.host} without a token: anyone who can reach it could read and overwrite disks. ` +
    'Set one with --token <secret> or DISKPORT_TOKEN=<secret>, or listen on 127.0.0.1.'
  );
}
