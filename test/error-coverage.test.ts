/**
 * Every code in the error registry is produced by a test: some test that
 * drives diskport asserts it as a value ('CODE', "CODE", `CODE` or /CODE/,
 * outside comments), and something in src/ raises it. The unit tier
 * (test/unit) does not count: it checks pure modules, and names codes there
 * as inputs as often as it sees them raised. A code no request can produce has no place
 * in the registry; one that can has a test that sends that request and checks
 * the answer. Reads files only: no server.
 */
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { ERRORS, type ErrorCode } from '../src/errors.js';

const ROOT = path.resolve(import.meta.dirname, '..');
const CODES = Object.keys(ERRORS) as ErrorCode[];

/** The TypeScript files under `dir` (relative to the checkout), their comment lines left out. */
function sources(dir: string, except: string[] = []): { file: string; text: string }[] {
  return readdirSync(path.join(ROOT, dir), { recursive: true, encoding: 'utf8' })
    .filter((f) => f.endsWith('.ts'))
    .map((f) => path.join(dir, f))
    .filter((f) => !except.includes(f))
    .map((file) => ({
      file,
      text: readFileSync(path.join(ROOT, file), 'utf8')
        .split('\n')
        .filter((line) => !/^\s*(\/\/|\/\*|\*)/.test(line))
        .join('\n'),
    }));
}

/** The code as a value of its own: a string or template literal, or a regex, holding nothing else. */
const asValue = (code: string) => new RegExp(`(['"\`/])${code}\\1`);

const TESTS = sources('test', [path.join('test', path.basename(import.meta.filename))]).filter(
  (t) => !t.file.startsWith(path.join('test', 'unit') + path.sep),
);
const SRC = sources('src');

test('the scan sees the test files and the registry', () => {
  assert.ok(TESTS.length > 30, `found only ${TESTS.length} test files`);
  assert.ok(CODES.length > 40, `found only ${CODES.length} codes`);
  assert.ok(
    TESTS.some((t) => asValue('VDI_NOT_FOUND').test(t.text)),
    'a code every suite asserts is found: is the pattern still right?',
  );
});

test('every error code is asserted by at least one test', () => {
  const untested = CODES.filter((code) => !TESTS.some((t) => asValue(code).test(t.text)));
  assert.deepEqual(
    untested,
    [],
    `no test asserts ${untested.join(', ')}: add a test that sends the request producing each ` +
      'and checks its status and code (in the test file of that feature), or, if no request can ' +
      'produce one, remove it from src/errors.ts and run npm run gen:errors',
  );
});

test('every error code is raised somewhere in src/', () => {
  const unraised = CODES.filter((code) => !SRC.some((s) => asValue(code).test(s.text)));
  assert.deepEqual(
    unraised,
    [],
    `nothing in src/ raises ${unraised.join(', ')}: remove it from src/errors.ts and run npm run gen:errors`,
  );
});
