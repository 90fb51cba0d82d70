/**
 * openapi.yaml is the contract, so request bodies are validated against its
 * schemas rather than against a second copy written in code. Tests validate
 * responses against the same document (test/helpers/openapi.ts).
 */
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import type { Ajv, ErrorObject, ValidateFunction } from 'ajv';
import { ApiError } from '../errors.js';

export const OPENAPI_PATH = fileURLToPath(new URL('../../openapi.yaml', import.meta.url));

/** Written by `npm run build` (scripts/openapi-json.mjs): dist/openapi.json beside dist/http/. */
const BUILT_PATH = fileURLToPath(new URL('../openapi.json', import.meta.url));

/**
 * The parsed document: the build's JSON copy when it was made from this very
 * text (start-up skips the YAML parser, a quarter of it), else the YAML parsed
 * here (under tsx, or openapi.yaml edited since the build).
 */
function loadDocument(): Record<string, unknown> {
  const text = readFileSync(OPENAPI_PATH, 'utf8');
  const sha256 = createHash('sha256').update(text).digest('hex');
  try {
    const built = JSON.parse(readFileSync(BUILT_PATH, 'utf8')) as {
      sha256?: string;
      document?: Record<string, unknown>;
    };
    if (built.sha256 === sha256 && built.document) return built.document;
  } catch {
    // no build beside this module (tsx runs src/): parse the YAML
  }
  const { parse } = createRequire(import.meta.url)('yaml') as typeof import('yaml');
  return parse(text) as Record<string, unknown>;
}

export const openapiDocument = loadDocument();

let ajv: Ajv | undefined;

/**
 * The validator of the document, made at the first request body it checks:
 * loading ajv and adding the document took a third of the server's start-up,
 * and most starts serve transfers long before anyone creates a VDI.
 */
function openapiAjv(): Ajv {
  if (!ajv) {
    const require = createRequire(import.meta.url);
    const { Ajv } = require('ajv') as typeof import('ajv');
    const addFormats = require('ajv-formats') as (ajv: Ajv) => Ajv;
    ajv = new Ajv({ strict: false, allErrors: true });
    addFormats(ajv);
    ajv.addSchema(openapiDocument, 'openapi');
  }
  return ajv;
}

const compiled = new Map<string, ValidateFunction>();

export function schemaValidator(ref: string): ValidateFunction {
  let v = compiled.get(ref);
  if (!v) {
    v = openapiAjv().compile({ $ref: `openapi${ref}` });
    compiled.set(ref, v);
  }
  return v;
}

export function describeErrors(errors: ErrorObject[] | null | undefined, what = 'body'): string {
  return (errors ?? [])
    .map((e) => {
      const where = e.instancePath ? `${what}${e.instancePath.replace(/\//g, '.')}` : what;
      if (e.keyword === 'additionalProperties') {
        return `${where} has an unknown field '${(e.params as { additionalProperty: string }).additionalProperty}'`;
      }
      return `${where} ${e.message}`;
    })
    .join('; ');
}

/** Validates a request body against components/schemas/<name>; throws 400 INVALID_REQUEST saying what is wrong. */
export function validateBody<T>(name: string, body: unknown): T {
  const v = schemaValidator(`#/components/schemas/${name}`);
  if (body === undefined || body === null || !v(body)) {
    const message =
      body === undefined || body === null ? 'a JSON body is required' : describeErrors(v.errors);
    throw new ApiError('INVALID_REQUEST', `invalid request: ${message}`, { errors: v.errors ?? [] });
  }
  return body as T;
}
