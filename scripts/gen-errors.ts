/**
 * Writes the error registry (src/errors.ts) into openapi.yaml as
 * components/schemas/ErrorCode: the enum of codes, their statuses
 * (x-status) and a table of what each means. `npm run gen:errors`;
 * test/errors.test.ts fails while openapi.yaml is out of date.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { ERRORS, type ErrorCode } from '../src/errors.js';

export const OPENAPI_FILE = fileURLToPath(new URL('../openapi.yaml', import.meta.url));

const BEGIN =
  '    # BEGIN ErrorCode: written from src/errors.ts by `npm run gen:errors`; edit the registry, not this';
const END = '    # END ErrorCode';
const ANCHOR = '  schemas:\n';

export function renderErrorCodes(): string {
  const codes = Object.keys(ERRORS) as ErrorCode[];
  const rows = codes.map(
    (c) => `        | \`${c}\` | ${ERRORS[c].status} | ${ERRORS[c].meaning.replace(/\|/g, '\\|')} |`,
  );
  return [
    BEGIN,
    '    ErrorCode:',
    '      type: string',
    '      description: |-',
    '        Every code an error answer (or a failed task) carries; a code always comes with the same HTTP status.',
    '',
    '        | code | status | meaning |',
    '        |---|---|---|',
    ...rows,
    `      enum: [${codes.join(', ')}]`,
    `      x-status: { ${codes.map((c) => `${c}: ${ERRORS[c].status}`).join(', ')} }`,
    END,
  ].join('\n');
}

/** openapi.yaml's text with the ErrorCode block replaced (or added after `schemas:`). */
export function withErrorCodes(openapi: string): string {
  const begin = openapi.indexOf(BEGIN);
  if (begin >= 0) {
    const end = openapi.indexOf(END, begin);
    if (end < 0) throw new Error(`openapi.yaml has '${BEGIN}' without '${END}'`);
    return openapi.slice(0, begin) + renderErrorCodes() + openapi.slice(end + END.length);
  }
  const at = openapi.indexOf(ANCHOR);
  if (at < 0) throw new Error(`openapi.yaml has no '${ANCHOR.trim()}' section`);
  return `${openapi.slice(0, at + ANCHOR.length)}${renderErrorCodes()}\n${openapi.slice(at + ANCHOR.length)}`;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const before = readFileSync(OPENAPI_FILE, 'utf8');
  const after = withErrorCodes(before);
  if (after !== before) writeFileSync(OPENAPI_FILE, after);
  console.log(after === before ? 'openapi.yaml is up to date' : 'openapi.yaml: ErrorCode written');
}
