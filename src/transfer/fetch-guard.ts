/**
 * The SSRF guard of pull and push: diskport connects to URLs its clients
 * name, so it must not be turned against its own host or the cloud metadata
 * service. A URL must be http or https; its host is resolved once (every
 * address) and refused if any address is one that ip-ranges.ts refuses
 * (loopback, link-local, unspecified, IPv6 unique-local, and IPv6 forms that
 * carry such an IPv4 address), unless `--allow-fetch` covers it. The
 * connection then goes to the address that was checked (a pinned lookup),
 * never to a second resolution, so DNS rebinding cannot slip past the check.
 */
import { lookup } from 'node:dns/promises';
import type { LookupFunction } from 'node:net';
import { BlockList, isIP } from 'node:net';
import type { Agent } from 'undici';
import { ApiError } from '../errors.js';
import { refusedBecause } from './ip-ranges.js';
import { undici } from './undici.js';

/** A URL whose host was resolved and checked: connect to `address`, nowhere else. */
export interface FetchTarget {
  url: URL;
  address: string;
  family: 4 | 6;
}

/** Seconds without a byte (or without response headers) before a connection counts as broken. */
const IDLE_TIMEOUT_MS = 60_000;

export class FetchGuard {
  private readonly allowAll: boolean;
  private readonly allowed = new BlockList();

  /** `allow`: the `--allow-fetch` list (CIDRs, bare addresses, or `*`), already validated by the config. */
  constructor(allow: readonly string[]) {
    this.allowAll = allow.includes('*');
    for (const item of allow) {
      if (item === '*') continue;
      const [addr, prefix] = item.split('/');
      const type = isIP(addr) === 6 ? 'ipv6' : 'ipv4';
      if (prefix === undefined) this.allowed.addAddress(addr, type);
      else this.allowed.addSubnet(addr, Number(prefix), type);
    }
  }

  /** True when diskport may connect to `address`. */
  permits(address: string): boolean {
    const type = isIP(address) === 6 ? 'ipv6' : 'ipv4';
    return this.allowAll || refusedBecause(address) === null || this.allowed.check(address, type);
  }

  /** Parses `raw` (the request's `field`), resolves its host once and checks every address. */
  async check(raw: string, field: string): Promise<FetchTarget> {
    let url: URL;
    try {
      url = new URL(raw);
    } catch {
      throw new ApiError('INVALID_URL', `${field} is not a URL: '${raw}'`, { field });
    }
    if (url.protocol !== 'http:' && url.protocol !== 'https:') {
      throw new ApiError(
        'INVALID_URL',
        `${field} must be an http or https URL, not ${url.protocol.replace(/:$/, '')}`,
        { field },
      );
    }
    const host = url.hostname.replace(/^\[(.*)\]$/, '$1');
    let addresses: { address: string; family: number }[];
    try {
      addresses = await lookup(host, { all: true, verbatim: true });
    } catch (err) {
      throw new ApiError(
        'FETCH_TARGET_UNRESOLVABLE',
        `${field}: cannot resolve host '${host}' (${(err as NodeJS.ErrnoException).code ?? err})`,
        { field, host },
      );
    }
    const refused = addresses.filter((a) => !this.permits(a.address));
    if (refused.length || addresses.length === 0) {
      throw new ApiError(
        'FETCH_TARGET_FORBIDDEN',
        `${field}: host '${host}' resolves to ${refused.map((a) => `${a.address} (${refusedBecause(a.address)})`).join(', ')}; ` +
          'diskport does not fetch from or send to those unless --allow-fetch (DISKPORT_ALLOW_FETCH) lists them',
        { field, host, addresses: refused.map((a) => a.address) },
      );
    }
    const first = addresses[0];
    return { url, address: first.address, family: first.family === 6 ? 6 : 4 };
  }
}

/** An undici dispatcher that connects to the checked address of `target` (and to no other host). */
export function pinnedAgent(target: FetchTarget): Agent {
  const host = target.url.hostname.replace(/^\[(.*)\]$/, '$1');
  const pinned: LookupFunction = (hostname, options, callback) => {
    if (hostname !== host) {
      const err = Object.assign(new Error(`refusing to resolve ${hostname}: only ${host} was checked`), {
        code: 'ENOTFOUND',
      });
      callback(err, '', 0);
      return;
    }
    if (options.all) {
      (callback as unknown as (e: null, a: { address: string; family: number }[]) => void)(null, [
        { address: target.address, family: target.family },
      ]);
    } else {
      callback(null, target.address, target.family);
    }
  };
  return new (undici().Agent)({
    connect: { lookup: pinned },
    headersTimeout: IDLE_TIMEOUT_MS,
    bodyTimeout: IDLE_TIMEOUT_MS,
  });
}
