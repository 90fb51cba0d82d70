/** The error registry is the one list of codes: openapi.yaml carries it, and a test provokes each code. */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { OPENAPI_FILE, withErrorCodes } from '../scripts/gen-errors.js';
import { ERRORS, type ErrorCode } from '../src/errors.js';

const CODES = Object.keys(ERRORS) as ErrorCode[];

test('openapi.yaml carries the registry as ErrorCode (run npm run gen:errors after changing src/errors.ts)', () => {
  const text = readFileSync(OPENAPI_FILE, 'utf8');
  assert.ok(
    withErrorCodes(text) === text,
    'openapi.yaml is out of date with src/errors.ts: npm run gen:errors',
  );
});

test('every code has an error status and a one-line meaning', () => {
  for (const code of CODES) {
    const { status, meaning } = ERRORS[code];
    assert.match(code, /^[A-Z][A-Z0-9_]*$/);
    assert.ok(status >= 400 && status <= 599, `${code}: ${status} is not an error status`);
    assert.ok(meaning.length > 0 && !meaning.includes('\n'), `${code}: the meaning is one line`);
  }
});
