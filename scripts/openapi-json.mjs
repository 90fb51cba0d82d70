#!/usr/bin/env node
/**
 * Part of `npm run build`: writes openapi.yaml, parsed, to dist/openapi.json
 * with the sha256 of the text it came from. Parsing the YAML took a quarter of
 * the server's start-up; src/http/openapi.ts takes this copy when its hash is
 * that of the openapi.yaml beside it, and parses the YAML itself otherwise
 * (under tsx, or after an edit not yet built), so it is never stale.
 */
import { createHash } from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { parse } from 'yaml';

const source = fileURLToPath(new URL('../openapi.yaml', import.meta.url));
const target = fileURLToPath(new URL('../dist/openapi.json', import.meta.url));
const text = readFileSync(source, 'utf8');
mkdirSync(fileURLToPath(new URL('../dist/', import.meta.url)), { recursive: true });
writeFileSync(
  target,
  JSON.stringify({ sha256: createHash('sha256').update(text).digest('hex'), document: parse(text) }),
);
