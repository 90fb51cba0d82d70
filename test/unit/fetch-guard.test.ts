/** The SSRF guard of pull and push: which addresses diskport may connect to, and which URLs it takes. */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { ApiError } from '../../src/errors.js';
import { FetchGuard } from '../../src/transfer/fetch-guard.js';

describe('FetchGuard.permits', () => {
  const cases: { address: string; allow: string[]; permitted: boolean }[] = [
    // Public addresses are always fine.
    { address: '93.184.216.34', allow: [], permitted: true },
    { address: '10.1.2.3', allow: [], permitted: true },
    { address: '2001:db8::1', allow: [], permitted: true },
    // Loopback, link-local (cloud metadata) and unspecified are not...
    { address: '127.0.0.1', allow: [], permitted: false },
    { address: '127.255.255.254', allow: [], permitted: false },
    { address: '169.254.169.254', allow: [], permitted: false },
    { address: '0.0.0.0', allow: [], permitted: false },
    { address: '0.1.2.3', allow: [], permitted: false },
    { address: '::1', allow: [], permitted: false },
    { address: '::', allow: [], permitted: false },
    { address: 'fe80::1', allow: [], permitted: false },
    { address: 'febf:ffff::1', allow: [], permitted: false },
    // ...unless --allow-fetch lists them: a subnet, a bare address, or everything.
    { address: '127.0.0.1', allow: ['127.0.0.0/8'], permitted: true },
    { address: '127.0.0.2', allow: ['127.0.0.1'], permitted: false },
    { address: '127.0.0.1', allow: ['127.0.0.1'], permitted: true },
    { address: '169.254.169.254', allow: ['127.0.0.0/8'], permitted: false },
    { address: '::1', allow: ['::1'], permitted: true },
    { address: 'fe80::1', allow: ['fe80::/64'], permitted: true },
    { address: 'fe80:0:0:1::1', allow: ['fe80::/64'], permitted: false },
    { address: '169.254.169.254', allow: ['*'], permitted: true },
  ];
  for (const c of cases) {
    test(`${c.address} with --allow-fetch ${JSON.stringify(c.allow)}: ${c.permitted ? 'permitted' : 'refused'}`, () => {
      assert.equal(new FetchGuard(c.allow).permits(c.address), c.permitted);
    });
  }
});

describe('FetchGuard.check', () => {
  const guard = new FetchGuard([]);

  async function refusal(url: string, g = guard): Promise<ApiError> {
    const err = await g.check(url, 'source_url').then(
      () => assert.fail(`${url} was accepted`),
      (e: unknown) => e,
    );
    assert.ok(err instanceof ApiError, String(err));
    assert.equal(err.status, 400);
    return err;
  }

  for (const url of ['ftp://example.org/disk.raw', 'file:///etc/passwd', 'not a url', 'gopher://x/', '']) {
    test(`'${url}' is refused with INVALID_URL`, async () => {
      const err = await refusal(url);
      assert.equal(err.code, 'INVALID_URL');
      assert.equal(err.details?.field, 'source_url');
    });
  }

  for (const url of [
    'http://127.0.0.1:9/disk.raw',
    'http://localhost/disk.raw',
    'http://[::1]/',
    'http://169.254.169.254/latest/meta-data',
    'http://0.0.0.0/',
    'http://[::ffff:127.0.0.1]/',
    'https://[fe80::1]/',
    'http://2130706433/',
    'http://0x7f.1/',
  ]) {
    test(`${url} is refused with FETCH_TARGET_FORBIDDEN, naming the address`, async () => {
      const err = await refusal(url);
      assert.equal(err.code, 'FETCH_TARGET_FORBIDDEN');
      assert.ok(((err.details?.addresses as string[] | undefined) ?? []).length > 0);
      assert.match(err.message, /--allow-fetch/);
    });
  }

  test('an address that is permitted comes back pinned: the connection goes there, nowhere else', async () => {
    const target = await new FetchGuard(['127.0.0.0/8']).check(
      'http://127.0.0.1:8080/disk.raw?x=1',
      'source_url',
    );
    assert.deepEqual({ address: target.address, family: target.family }, { address: '127.0.0.1', family: 4 });
    assert.equal(target.url.href, 'http://127.0.0.1:8080/disk.raw?x=1');
    const v6 = await new FetchGuard(['::1']).check('http://[::1]:8080/', 'target_url');
    assert.deepEqual({ address: v6.address, family: v6.family }, { address: '::1', family: 6 });
  });

  test('a public address literal needs no allow-list', async () => {
    const target = await guard.check('https://192.0.2.10/images/disk.qcow2', 'source_url');
    assert.equal(target.address, '192.0.2.10');
  });
});
