/** Checks JSON responses against openapi.yaml, so the document cannot drift from the code. */
import assert from 'node:assert/strict';
import { describeErrors, openapiDocument, schemaValidator } from '../../src/http/openapi.js';

type Operation = {
  responses?: Record<string, { $ref?: string; content?: Record<string, { schema?: unknown }> }>;
};
const paths = openapiDocument.paths as Record<string, Record<string, Operation>>;

const templates = Object.keys(paths).map((t) => ({
  template: t,
  regex: new RegExp(`^${t.replace(/\{[^}]+\}/g, '[^/]+')}$`),
}));

export function assertMatchesOpenApi(method: string, urlPath: string, status: number, body: unknown): void {
  const pathname = urlPath.split('?')[0];
  const match = templates.find((t) => t.regex.test(pathname));
  if (!match) return; // endpoints outside the document (404 probes) are not checked
  const op = paths[match.template][method.toLowerCase()];
  assert.ok(op, `openapi.yaml has no ${method} ${match.template}`);
  const response = op.responses?.[String(status)];
  assert.ok(response, `openapi.yaml does not document status ${status} for ${method} ${match.template}`);
  const ref = response.$ref
    ? '#/components/schemas/Error'
    : (response.content?.['application/json']?.schema as { $ref?: string } | undefined)?.$ref;
  const schema = response.$ref ? { $ref: ref } : response.content?.['application/json']?.schema;
  if (!schema || typeof body !== 'object') return;
  const validate = (schema as { $ref?: string }).$ref
    ? schemaValidator((schema as { $ref: string }).$ref)
    : schemaValidator(
        `#/paths/${match.template.replace(/~/g, '~0').replace(/\//g, '~1')}/${method.toLowerCase()}/responses/${status}/content/application~1json/schema`,
      );
  assert.ok(
    validate(body),
    `${method} ${urlPath} ${status} does not match openapi.yaml: ${describeErrors(validate.errors, 'response')}\n${JSON.stringify(body)}`,
  );
}
