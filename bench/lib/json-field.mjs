#!/usr/bin/env node
/**
 * Prints one top-level field of the JSON document on stdin (for bench scripts).
 * Usage: node json-field.mjs FIELD < doc.json
 */
import fs from 'node:fs';

const field = process.argv[2];
const doc = JSON.parse(fs.readFileSync(0, 'utf8'));
if (!(field in doc)) {
  console.error(`json-field: no '${field}' in ${JSON.stringify(doc).slice(0, 300)}`);
  process.exit(1);
}
process.stdout.write(String(doc[field]));
