/**
 * The SSRF guard's address rules (src/transfer/ip-ranges.ts), table-driven:
 * every IPv4 and IPv6 form that reaches loopback, link-local, unspecified or
 * IPv6 private space is refused unless --allow-fetch names it.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { FetchGuard } from '../../src/transfer/fetch-guard.js';
import { embeddedIPv4, refusedBecause } from '../../src/transfer/ip-ranges.js';

/** [address, why it is refused (a fragment of the reason), or null when it may be reached] */
const ADDRESSES: [string, string | null][] = [
  // IPv4 on its own
  ['127.0.0.1', 'loopback'],
  ['127.255.255.254', 'loopback'],
  ['169.254.169.254', 'link-local'],
  ['0.0.0.0', 'unspecified'],
  ['10.0.0.1', null],
  ['172.16.0.1', null],
  ['192.168.1.1', null],
  ['8.8.8.8', null],
  // IPv6 on its own
  ['::1', 'loopback'],
  ['::', 'unspecified'],
  ['fe80::1', 'link-local'],
  ['fe80::1%lo', 'link-local'],
  ['fd00:ec2::254', 'unique-local'],
  ['fc00::1', 'unique-local'],
  ['fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff', 'unique-local'],
  ['fec0::1', 'site-local'],
  ['2001:db8::1', null],
  ['2606:4700:4700::1111', null],
  // IPv4-mapped: the IPv4 address itself, so its rules (a private one is reachable)
  ['::ffff:127.0.0.1', 'loopback'],
  ['::ffff:7f00:1', 'loopback'],
  ['::ffff:169.254.169.254', 'link-local'],
  ['::ffff:10.0.0.1', null],
  // IPv4-compatible (deprecated)
  ['::127.0.0.1', 'IPv4-compatible, carrying the loopback 127.0.0.1'],
  ['::7f00:1', 'IPv4-compatible, carrying the loopback 127.0.0.1'],
  ['::169.254.169.254', 'link-local'],
  ['::10.0.0.1', 'private'],
  // NAT64 (RFC 6052 well-known prefix; local-use prefix refused whole)
  ['64:ff9b::127.0.0.1', 'NAT64, carrying the loopback 127.0.0.1'],
  ['64:ff9b::7f00:1', 'loopback'],
  ['64:ff9b::169.254.169.254', 'link-local'],
  ['64:ff9b::10.1.2.3', 'private'],
  ['64:ff9b::172.31.255.255', 'private'],
  ['64:ff9b::192.168.0.1', 'private'],
  ['64:ff9b::100.64.0.1', 'shared'],
  ['64:ff9b::0.0.0.0', 'unspecified'],
  ['64:ff9b::8.8.8.8', null],
  ['64:ff9b:1::102:304', 'local-use NAT64'],
  // 6to4
  ['2002:7f00:1::', '6to4, carrying the loopback 127.0.0.1'],
  ['2002:7f00:0001:1234::5', 'loopback'],
  ['2002:a9fe:a9fe::1', 'link-local'],
  ['2002:a00:1::1', 'private'],
  ['2002:c0a8:101::1', 'private'],
  ['2002:808:808::1', null],
  // Teredo: server in bits 32-63, client (inverted) in the last 32
  ['2001:0:7f00:1::1', 'Teredo server, carrying the loopback 127.0.0.1'],
  ['2001:0:4136:e378:8000:63bf:80ff:fffe', 'Teredo client, carrying the loopback 127.0.0.1'],
  ['2001:0:4136:e378:8000:63bf:3fff:fdd2', null],
];

describe('the SSRF guard, offline', () => {
  const guard = new FetchGuard([]);
  for (const [address, why] of ADDRESSES) {
    test(`${address}: ${why ? `refused (${why})` : 'reachable'}`, () => {
      const reason = refusedBecause(address);
      if (why === null) {
        assert.equal(reason, null);
        assert.ok(guard.permits(address));
      } else {
        assert.ok(reason?.includes(why), `reason '${reason}' should say '${why}'`);
        assert.equal(guard.permits(address), false);
      }
    });
  }

  test('the forms that carry an IPv4 address are read at the right bits', () => {
    assert.deepEqual(embeddedIPv4('::ffff:1.2.3.4'), [{ form: 'IPv4-mapped', ipv4: '1.2.3.4' }]);
    assert.deepEqual(embeddedIPv4('::102:304'), [{ form: 'IPv4-compatible', ipv4: '1.2.3.4' }]);
    assert.deepEqual(embeddedIPv4('64:ff9b::102:304'), [{ form: 'NAT64', ipv4: '1.2.3.4' }]);
    assert.deepEqual(embeddedIPv4('2002:102:304::'), [{ form: '6to4', ipv4: '1.2.3.4' }]);
    assert.deepEqual(embeddedIPv4('2001:0:4136:e378:8000:63bf:3fff:fdd2'), [
      { form: 'Teredo server', ipv4: '65.54.227.120' },
      { form: 'Teredo client', ipv4: '192.0.2.45' },
    ]);
    assert.deepEqual(embeddedIPv4('2001:db8::1'), []);
  });

  test('--allow-fetch names a form to let it through, and only what it names', () => {
    const nat64 = new FetchGuard(['64:ff9b::/96']);
    assert.ok(nat64.permits('64:ff9b::7f00:1'));
    assert.equal(nat64.permits('2002:7f00:1::'), false);
    const metadata = new FetchGuard(['fd00:ec2::254']);
    assert.ok(metadata.permits('fd00:ec2::254'));
    assert.equal(metadata.permits('fd00:ec2::253'), false);
    // A loopback allowance covers the mapped form (the same socket address), not the other forms.
    const loopback = new FetchGuard(['127.0.0.0/8']);
    assert.ok(loopback.permits('127.0.0.1'));
    assert.ok(loopback.permits('::ffff:127.0.0.1'));
    assert.equal(loopback.permits('::127.0.0.1'), false);
    assert.equal(loopback.permits('64:ff9b::127.0.0.1'), false);
    const all = new FetchGuard(['*']);
    for (const [address] of ADDRESSES) assert.ok(all.permits(address), address);
  });

  test('check() refuses a URL whose literal host is a refused form, naming why', async () => {
    await assert.rejects(
      new FetchGuard([]).check('http://[64:ff9b::127.0.0.1]:8080/x', 'source_url'),
      (err) => {
        const e = err as { status: number; code: string; message: string };
        assert.equal(e.status, 400);
        assert.equal(e.code, 'FETCH_TARGET_FORBIDDEN');
        assert.match(e.message, /64:ff9b::7f00:1 \(NAT64, carrying the loopback 127\.0\.0\.1\)/);
        return true;
      },
    );
    const ok = await new FetchGuard([]).check('http://[64:ff9b::808:808]/x', 'source_url');
    assert.equal(ok.address, '64:ff9b::808:808');
  });
});
