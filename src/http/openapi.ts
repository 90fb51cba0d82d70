/**
 * openapi.yaml is the contract, so request bodies are validated against its
 * schemas rather than against a second copy written in code. Tests validate
 * responses against the same document (test/helpers/openapi.ts).
 */
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { Ajv, type ErrorObject, type ValidateFunction } from 'ajv';
import addFormatsModule from 'ajv-formats';
import { parse } from 'yaml';
import { ApiError } from '../errors.js';

// ajv-formats is CommonJS; its default export arrives one level down under ESM.
type AddFormats = (ajv: Ajv) => Ajv;
const addFormats = ((addFormatsModule as unknown as { default?: AddFormats }).default ??
  addFormatsModule) as unknown as AddFormats;

export const OPENAPI_PATH = fileURLToPath(new URL('../../openapi.yaml', import.meta.url));

export const openapiDocument = parse(readFileSync(OPENAPI_PATH, 'utf8')) as Record<string, unknown>;

export const ajv = new Ajv({ strict: false, allErrors: true });
addFormats(ajv);
ajv.addSchema(openapiDocument, 'openapi');

const compiled = new Map<string, ValidateFunction>();

export function schemaValidator(ref: string): ValidateFunction {
  let v = compiled.get(ref);
  if (!v) {
    v = ajv.compile({ $ref: `openapi${ref}` });
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
