/**
 * Settings: every one has a CLI flag and an environment variable; flags win.
 */
import { isIP } from 'node:net';
import path from 'node:path';
import { Command, InvalidArgumentError } from 'commander';
import { VERSION } from './version.js';

export interface Config {
  host: string;
  port: number;
  dataDir: string;
  token?: string;
  logLevel: string;
  /** CIDRs (or `*`) that pull and push may reach although the SSRF guard forbids them (see transfer/ip-ranges.ts). */
  allowFetch: string[];
  /** Finished tasks are kept this long, and at most this many, then pruned. */
  taskRetention: { maxAgeSeconds: number; maxCount: number };
}

export const DEFAULTS = {
  host: '127.0.0.1',
  port: 8080,
  dataDir: './data',
  logLevel: 'info',
  taskRetention: '7d',
  taskRetentionCount: 10_000,
} as const;

const DURATION_UNITS_SECONDS: Record<string, number> = { s: 1, m: 60, h: 3600, d: 86_400 };

/** `7d`, `12h`, `30m`, `90s` or a bare number of seconds. */
export function parseDuration(value: string): number {
  const m = /^(\d+)([smhd]?)$/.exec(value.trim());
  if (!m) throw new InvalidArgumentError(`'${value}' is not a duration (e.g. 7d, 12h, 30m, 90s)`);
  return Number(m[1]) * DURATION_UNITS_SECONDS[m[2] || 's'];
}

function parseCount(value: string): number {
  if (!/^\d+$/.test(value.trim())) throw new InvalidArgumentError(`'${value}' is not a whole number`);
  return Number(value);
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
    .exitOverride();
  program.parse(argv, { from: 'user' });
  const o = program.opts<Config & { taskRetention: number; taskRetentionCount: number }>();
  return {
    host: o.host,
    port: o.port,
    dataDir: path.resolve(o.dataDir),
    // not a commander default: --help would print the secret
    token: o.token || env.DISKPORT_TOKEN || undefined,
    logLevel: o.logLevel,
    allowFetch: o.allowFetch,
    taskRetention: { maxAgeSeconds: o.taskRetention, maxCount: o.taskRetentionCount },
  };
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
