/**
 * Settings: every one has a CLI flag and an environment variable; flags win.
 */
import { isIP } from 'node:net';
import path from 'node:path';
import { Command, InvalidArgumentError } from 'commander';

export interface Config {
  host: string;
  port: number;
  dataDir: string;
  token?: string;
  logLevel: string;
  /** CIDRs (or `*`) that pull and push may reach although the SSRF guard forbids them (loopback, link-local). */
  allowFetch: string[];
}

export const DEFAULTS = { host: '127.0.0.1', port: 8080, dataDir: './data', logLevel: 'info' } as const;

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
      'addresses pull/push may reach despite the SSRF guard (loopback, link-local): CIDRs or * (env DISKPORT_ALLOW_FETCH)',
      parseAllowFetch,
      env.DISKPORT_ALLOW_FETCH ? parseAllowFetch(env.DISKPORT_ALLOW_FETCH) : [],
    )
    .exitOverride();
  program.parse(argv, { from: 'user' });
  const o = program.opts<Config>();
  return {
    host: o.host,
    port: o.port,
    dataDir: path.resolve(o.dataDir),
    // not a commander default: --help would print the secret
    token: o.token || env.DISKPORT_TOKEN || undefined,
    logLevel: o.logLevel,
    allowFetch: o.allowFetch,
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
