/** openapi.yaml is the contract: every route the code serves is in it, with its method. */
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { openapiDocument } from '../src/http/openapi.js';
import { ROOT } from './helpers/server.js';

const ROUTE = /\.(get|put|post|patch|delete|head)\(\s*'(\/[^']*)'/g;

test('every route in src/routes is documented in openapi.yaml with its method', () => {
  const paths = openapiDocument.paths as Record<string, Record<string, unknown>>;
  const dir = path.join(ROOT, 'src/routes');
  const routes: string[] = [];
  for (const file of readdirSync(dir)) {
    for (const m of readFileSync(path.join(dir, file), 'utf8').matchAll(ROUTE)) {
      const [, method, route] = m;
      const template = route.replace(/:(\w+)/g, '{$1}');
      routes.push(`${method} ${template}`);
      assert.ok(paths[template], `${file}: ${route} is not in openapi.yaml`);
      assert.ok(paths[template][method], `${file}: ${method.toUpperCase()} ${route} is not in openapi.yaml`);
    }
  }
  assert.ok(routes.length > 20, `found only ${routes.length} routes: is the pattern still right?`);
});
