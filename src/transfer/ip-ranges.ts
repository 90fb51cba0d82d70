/**
 * Which addresses the SSRF guard of pull and push refuses, and why.
 *
 * IPv4: loopback (127.0.0.0/8), link-local (169.254.0.0/16, where cloud
 * metadata lives) and unspecified (0.0.0.0/8). Private ranges (10/8,
 * 172.16/12, 192.168/16) stay reachable: pulling from a NAS on the LAN is
 * what diskport is for.
 *
 * IPv6: loopback (::1), unspecified (::), link-local (fe80::/10), and the
 * private ranges where cloud metadata also lives: unique-local fc00::/7
 * (AWS's fd00:ec2::254) and the deprecated site-local fec0::/10. IPv6
 * forms that carry an IPv4 address are judged by the address they carry:
 * IPv4-mapped ::ffff:0:0/96 and IPv4-compatible ::/96 (RFC 4291 §2.5.5),
 * NAT64 64:ff9b::/96 (RFC 6052), 6to4 2002::/16 (RFC 3056) and Teredo
 * 2001::/32 (RFC 4380, server and client). A mapped address is its IPv4
 * address and follows the IPv4 rules. Any other carried IPv4 address is
 * refused when it is refused on its own, and also when it is private: RFC 6052 §3.1
 * forbids the NAT64 prefix for non-global IPv4, and 6to4 and Teredo need a
 * global one, so such an address can only be a way around this guard. The
 * local-use NAT64 prefix 64:ff9b:1::/48 (RFC 8215) places the IPv4 address
 * where its operator chooses, so the whole prefix is refused.
 */
import { BlockList, isIP } from 'node:net';

const REFUSED_V4: [string, number, string][] = [
  ['127.0.0.0', 8, 'loopback'],
  ['169.254.0.0', 16, 'link-local'],
  ['0.0.0.0', 8, 'unspecified'],
];

/** Private and shared IPv4 ranges: reachable as such, refused when an IPv6 address carries them. */
const PRIVATE_V4: [string, number, string][] = [
  ['10.0.0.0', 8, 'private'],
  ['172.16.0.0', 12, 'private'],
  ['192.168.0.0', 16, 'private'],
  ['100.64.0.0', 10, 'shared (carrier-grade NAT)'],
];

const REFUSED_V6: [string, number, string][] = [
  ['::1', 128, 'loopback'],
  ['::', 128, 'unspecified'],
  ['fe80::', 10, 'link-local'],
  ['fc00::', 7, 'unique-local'],
  ['fec0::', 10, 'site-local'],
  ['64:ff9b:1::', 48, 'local-use NAT64'],
];

function blockList(rules: [string, number, string][], type: 'ipv4' | 'ipv6'): [BlockList, string][] {
  return rules.map(([addr, prefix, why]) => {
    const list = new BlockList();
    list.addSubnet(addr, prefix, type);
    return [list, why];
  });
}

const REFUSED_V4_LISTS = blockList(REFUSED_V4, 'ipv4');
const PRIVATE_V4_LISTS = blockList(PRIVATE_V4, 'ipv4');
const REFUSED_V6_LISTS = blockList(REFUSED_V6, 'ipv6');

function match(lists: [BlockList, string][], address: string, type: 'ipv4' | 'ipv6'): string | null {
  for (const [list, why] of lists) if (list.check(address, type)) return why;
  return null;
}

/** The 16 bytes of a valid IPv6 address (a zone id, `%eth0`, is dropped). */
export function ipv6Bytes(address: string): Buffer {
  const text = address
    .split('%')[0]
    .replace(/(\d+)\.(\d+)\.(\d+)\.(\d+)$/, (_m, a, b, c, d) =>
      [(Number(a) << 8) | Number(b), (Number(c) << 8) | Number(d)].map((w) => w.toString(16)).join(':'),
    );
  const [head, tail] = text.split('::');
  const words = (part: string | undefined) =>
    part ? part.split(':').map((w) => Number.parseInt(w, 16)) : [];
  const left = words(head);
  const right = words(tail);
  const all =
    tail === undefined ? left : [...left, ...Array(8 - left.length - right.length).fill(0), ...right];
  const bytes = Buffer.alloc(16);
  all.forEach((w, i) => {
    bytes.writeUInt16BE(w, i * 2);
  });
  return bytes;
}

function v4At(bytes: Buffer, at: number, xor = 0): string {
  return [0, 1, 2, 3].map((i) => bytes[at + i] ^ xor).join('.');
}

function isZero(bytes: Buffer, from: number, to: number): boolean {
  for (let i = from; i < to; i++) if (bytes[i] !== 0) return false;
  return true;
}

/** The IPv4 addresses an IPv6 address carries, with the name of the form that carries them. */
export function embeddedIPv4(address: string): { form: string; ipv4: string }[] {
  const b = ipv6Bytes(address);
  if (isZero(b, 0, 10) && b[10] === 0xff && b[11] === 0xff)
    return [{ form: 'IPv4-mapped', ipv4: v4At(b, 12) }];
  if (isZero(b, 0, 12)) return [{ form: 'IPv4-compatible', ipv4: v4At(b, 12) }];
  if (b.readUInt32BE(0) === 0x0064ff9b && isZero(b, 4, 12)) return [{ form: 'NAT64', ipv4: v4At(b, 12) }];
  if (b.readUInt16BE(0) === 0x2002) return [{ form: '6to4', ipv4: v4At(b, 2) }];
  if (b.readUInt32BE(0) === 0x20010000) {
    return [
      { form: 'Teredo server', ipv4: v4At(b, 4) },
      { form: 'Teredo client', ipv4: v4At(b, 12, 0xff) },
    ];
  }
  return [];
}

/** Why the guard refuses `address` (a valid IPv4 or IPv6 address), or null when it may be reached. */
export function refusedBecause(address: string): string | null {
  if (isIP(address) === 4) return match(REFUSED_V4_LISTS, address, 'ipv4');
  const own = match(REFUSED_V6_LISTS, address, 'ipv6');
  if (own) return own;
  for (const { form, ipv4 } of embeddedIPv4(address)) {
    // A mapped address is its IPv4 address (the socket connects to that), so the same rules hold.
    const why =
      match(REFUSED_V4_LISTS, ipv4, 'ipv4') ??
      (form === 'IPv4-mapped' ? null : match(PRIVATE_V4_LISTS, ipv4, 'ipv4'));
    if (why) return `${form}, carrying the ${why} ${ipv4}`;
  }
  return null;
}
