/**
 * What an upload says about itself before its bytes count: Content-Range and
 * Content-Digest of a chunk, the declared checksum and size of a session.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { describe, test } from 'node:test';
import { ApiError } from '../../src/errors.js';
import { parseContentDigest, parseContentRange } from '../../src/http/transfer-headers.js';
import type { Vdi } from '../../src/storage/vdis.js';
import { checkDeclaredSize, parseChecksum, uploadLimit } from '../../src/transfer/upload-rules.js';

const MiB = 1024 * 1024;

/** Asserts that `fn` throws an ApiError with this status and code. */
function refuses(fn: () => unknown, status: number, code: string): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof ApiError, String(err));
    assert.equal(err.status, status, err.message);
    assert.equal(err.code, code, err.message);
    return true;
  });
}

describe('parseContentRange', () => {
  const valid: [string, { start: number; end: number; total: number | null }][] = [
    ['bytes 0-99/100', { start: 0, end: 99, total: 100 }],
    ['bytes 100-199/*', { start: 100, end: 199, total: null }],
    ['bytes */4096', { start: 0, end: -1, total: 4096 }],
    ['BYTES 0-0/1', { start: 0, end: 0, total: 1 }],
    ['  bytes 5-9/10  ', { start: 5, end: 9, total: 10 }],
    ['bytes 0-1048575/5497558138880', { start: 0, end: MiB - 1, total: 5 * 1024 ** 4 }],
  ];
  for (const [header, expected] of valid) {
    test(`'${header}'`, () => assert.deepEqual(parseContentRange(header), expected));
  }
  const invalid = [
    'bytes 0-99',
    'bytes=0-99/100',
    'bytes */*',
    'bytes 9-5/10',
    'bytes 0-10/10',
    'bytes -1-5/10',
    'items 0-9/10',
    'bytes 0-9/99999999999999999999',
    '',
  ];
  for (const header of invalid) {
    test(`'${header}' is refused with INVALID_CONTENT_RANGE`, () =>
      refuses(() => parseContentRange(header), 400, 'INVALID_CONTENT_RANGE'));
  }
});

describe('parseContentDigest', () => {
  const sha256 = createHash('sha256').update('chunk').digest();
  const sha512 = createHash('sha512').update('chunk').digest();
  const b64 = (b: Buffer) => b.toString('base64');
  test('sha-256', () =>
    assert.deepEqual(parseContentDigest(`sha-256=:${b64(sha256)}:`), { algorithm: 'sha256', value: sha256 }));
  test('sha-512 wins over sha-256, whatever the order', () => {
    for (const header of [
      `sha-256=:${b64(sha256)}:, sha-512=:${b64(sha512)}:`,
      `sha-512=:${b64(sha512)}:,sha-256=:${b64(sha256)}:`,
    ]) {
      assert.deepEqual(parseContentDigest(header), { algorithm: 'sha512', value: sha512 }, header);
    }
  });
  test('algorithms it does not know are ignored (RFC 9530)', () => {
    assert.equal(parseContentDigest('md5=:AAAA:'), null);
    assert.deepEqual(parseContentDigest(`unixsum=:AAAA:, SHA-256=:${b64(sha256)}:`)?.algorithm, 'sha256');
  });
  for (const header of [
    'sha-256=abc',
    `sha-256=:${b64(sha256).slice(4)}:`,
    'sha-256',
    `sha-512=:${b64(sha256)}:`,
  ]) {
    test(`'${header}' is refused with INVALID_CONTENT_DIGEST`, () =>
      refuses(() => parseContentDigest(header), 400, 'INVALID_CONTENT_DIGEST'));
  }
});

describe('parseChecksum', () => {
  const valid: [string, string, string][] = [
    [`sha256:${'a'.repeat(64)}`, 'sha256', 'a'.repeat(64)],
    [`SHA1:${'B'.repeat(40)}`, 'sha1', 'b'.repeat(40)],
    [`md5:${'0'.repeat(32)}`, 'md5', '0'.repeat(32)],
  ];
  for (const [value, algorithm, hex] of valid) {
    test(value, () => assert.deepEqual(parseChecksum(value), { algorithm, hex }));
  }
  for (const value of [
    `sha256:${'a'.repeat(63)}`,
    `sha256:${'a'.repeat(40)}`,
    `sha512:${'a'.repeat(128)}`,
    `sha256:${'g'.repeat(64)}`,
    'a'.repeat(64),
    '',
  ]) {
    test(`'${value.slice(0, 20)}…' is refused with INVALID_CHECKSUM`, () =>
      refuses(() => parseChecksum(value), 400, 'INVALID_CHECKSUM'));
  }
});

describe('how large an upload may be', () => {
  const vdi = (virtual_size: number) => ({ virtual_size }) as Vdi;
  test('raw: exactly the disk', () => {
    assert.equal(uploadLimit('raw', 10 * MiB), 10 * MiB);
    checkDeclaredSize(10 * MiB, 'raw', vdi(10 * MiB));
    refuses(() => checkDeclaredSize(10 * MiB + 1, 'raw', vdi(10 * MiB)), 413, 'TOO_LARGE');
  });
  test('vhd and qcow2: the disk plus room for their metadata', () => {
    for (const format of ['vhd', 'qcow2']) {
      const limit = uploadLimit(format, 64 * MiB);
      // A qcow2 of 512-byte clusters spends 1/64 of the disk on L2 tables.
      assert.ok(limit >= 64 * MiB + MiB + 16 * MiB, `${format}: ${limit}`);
      checkDeclaredSize(limit, format, vdi(64 * MiB));
      refuses(() => checkDeclaredSize(limit + 1, format, vdi(64 * MiB)), 413, 'TOO_LARGE');
    }
  });
  for (const size of [-1, 1.5, Number.NaN, 2 ** 53]) {
    test(`a declared size of ${size} is not a byte count`, () =>
      refuses(() => checkDeclaredSize(size, 'raw', vdi(MiB)), 400, 'INVALID_REQUEST'));
  }
});
