/**
 * The layers point one way. Each folder (or top-level module) of src/ has a
 * rank; a module may import its own layer or a lower one, never a higher
 * one. A new folder must be given a rank here, so the order is decided on
 * purpose, not by accident.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';

const SRC = path.resolve(import.meta.dirname, '../src');

/** Lowest first. Same rank: may import each other. */
const RANKS: Record<string, number> = {
  errors: 0,
  config: 0,
  secrets: 0,
  version: 0,
  image: 1, // random-access disk images and file I/O
  formats: 2, // wire-format codecs over images
  storage: 3, // SRs, VDIs, the metadata store
  tasks: 4, // task records, progress, recovery
  ops: 5, // extents, checksums: reading a VDI without moving it
  transfer: 6, // imports, exports, sessions, pull/push
  metrics: 7,
  services: 8, // wires the layers together
  http: 8, // HTTP machinery shared by routes
  routes: 9,
  app: 10,
  main: 11,
  cli: 11, // the client: above everything, imported by nothing
};

/** Upward imports being removed; this list only shrinks. */
const PENDING = new Set<string>([]);

function layerOf(file: string): string {
  const parts = path.relative(SRC, file).split(path.sep);
  return parts.length > 1 ? parts[0] : parts[0].replace(/\.ts$/, '');
}

function sourceFiles(dir: string): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) return sourceFiles(p);
    return p.endsWith('.ts') ? [p] : [];
  });
}

function relativeImports(file: string): string[] {
  const text = fs.readFileSync(file, 'utf8');
  const specs = [...text.matchAll(/(?:from|import)\s*\(?\s*'(\.{1,2}\/[^']+)'/g)].map((m) => m[1]);
  return specs.map((s) => path.resolve(path.dirname(file), s).replace(/\.js$/, '.ts'));
}

test('every module of src/ belongs to a ranked layer', () => {
  const unranked = [...new Set(sourceFiles(SRC).map(layerOf))].filter((l) => !(l in RANKS));
  assert.deepEqual(unranked, [], `give these a rank in test/layers.test.ts: ${unranked.join(', ')}`);
});

test('no module imports a layer above its own', () => {
  const violations: string[] = [];
  for (const file of sourceFiles(SRC)) {
    const from = layerOf(file);
    for (const target of relativeImports(file)) {
      const to = layerOf(target);
      const edge = `${path.relative(SRC, file)} imports ${path.relative(SRC, target)}`;
      if (RANKS[to] > RANKS[from] && !PENDING.has(edge)) {
        violations.push(
          `${path.relative(SRC, file)} (${from}) imports ${path.relative(SRC, target)} (${to})`,
        );
      }
    }
  }
  assert.deepEqual(violations, []);
});

test('the check sees an upward import when there is one', () => {
  // Guards the check itself: a regex that matched nothing would pass everything.
  const imports = relativeImports(path.join(SRC, 'routes/contents.ts')).map(layerOf);
  assert.ok(imports.includes('http'), 'routes/contents.ts imports src/http');
  assert.ok(RANKS.routes > RANKS.http && RANKS.image < RANKS.formats);
});
