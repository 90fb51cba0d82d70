/**
 * Every route of openapi.yaml, sent what a fuzzer or a broken client sends:
 * ids that are not valid percent-encoding (once a 500 from the router's
 * decodeURIComponent), hostile query values, ranges and Content-Ranges, and
 * bodies in encodings diskport cannot read (once a 500 from zlib). Each gets
 * a 4xx with diskport's JSON error (HEAD: the status alone), as openapi.yaml
 * documents it, and the server stays healthy.
 */
import assert from 'node:assert/strict';
import http from 'node:http';
import { after, before, describe, test } from 'node:test';
import { gzipSync } from 'node:zlib';
import { openapiDocument } from '../src/http/openapi.js';
import { api } from './helpers/api.js';
import { assertMatchesOpenApi } from './helpers/openapi.js';
import { startServer, type TestServer } from './helpers/server.js';

const MiB = 1024 * 1024;
const METHODS = ['get', 'put', 'post', 'patch', 'delete', 'head', 'options'];
const doc = openapiDocument as {
  paths: Record<string, Record<string, unknown> & { parameters?: Param[] }>;
  components: { parameters: Record<string, Param> };
};
type Param = { name?: string; in?: string; $ref?: string };
type ErrorBody = { error: { code: string; message: string } };

function resolve(p: Param): Param {
  return p.$ref ? doc.components.parameters[p.$ref.split('/').pop()!] : p;
}

const operations = Object.entries(doc.paths).flatMap(([template, item]) =>
  METHODS.filter((m) => item[m]).map((method) => {
    const op = item[method] as { parameters?: Param[] };
    const params = [...(item.parameters ?? []), ...(op.parameters ?? [])].map(resolve);
    return {
      method: method.toUpperCase(),
      template,
      query: params.filter((p) => p.in === 'query').map((p) => p.name!),
    };
  }),
);

/** Ids the router cannot decode: each must be 400 INVALID_REQUEST, never a 500. */
const MALFORMED_IDS = ['%ff%fe', '%zz', '%', '%e2%82', 'a%2', '%c0%af'];
/** Ids that decode to something no resource has: 404 (or 400), never a 500. */
const ODD_IDS = [
  '%00',
  '%2e%2e',
  '..%2f..%2fetc%2fpasswd',
  '%E2%80%AE',
  'x'.repeat(4000),
  "'%3B--",
  '%7B%7D',
];
const HOSTILE_VALUES = ['%ff', '%', '-1', '1e309', 'NaN', '', 'x'.repeat(3000), '0x10', '%00', 'true%00'];

interface RawResponse {
  status: number;
  headers: http.IncomingHttpHeaders;
  text: string;
}

/** A request with the path exactly as given (fetch would normalise it) and any headers. */
function raw(
  base: string,
  method: string,
  path: string,
  headers: Record<string, string> = {},
  body?: Buffer | string,
): Promise<RawResponse> {
  return new Promise((resolvePromise, reject) => {
    const req = http.request(`${base}${path}`, { method, headers, path }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () =>
        resolvePromise({
          status: res.statusCode ?? 0,
          headers: res.headers,
          text: Buffer.concat(chunks).toString(),
        }),
      );
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(body);
  });
}

/** Headers and a body that get a request past the framing checks, so the id or value is what is judged. */
function plausible(
  method: string,
  template: string,
): { headers: Record<string, string>; body?: Buffer | string } {
  const headers: Record<string, string> = template.startsWith('/v1/tus') ? { 'tus-resumable': '1.0.0' } : {};
  if (method === 'PUT') {
    return { headers: { ...headers, 'content-type': 'application/octet-stream' }, body: Buffer.alloc(512) };
  }
  if (method === 'PATCH' && template.startsWith('/v1/tus')) {
    return {
      headers: { ...headers, 'content-type': 'application/offset+octet-stream', 'upload-offset': '0' },
      body: Buffer.alloc(512),
    };
  }
  if (method === 'PATCH' || method === 'POST') {
    const json = template.endsWith('/data')
      ? { op: 'zero', offset: 0, size: 512 }
      : template === '/v1/vdis/{vdi}'
        ? { name_label: 'x' }
        : {};
    return { headers: { ...headers, 'content-type': 'application/json' }, body: JSON.stringify(json) };
  }
  return { headers };
}

/** The answer is a 4xx: diskport's JSON error as openapi.yaml documents it, or (HEAD) no body. */
function assertClientError(
  method: string,
  path: string,
  res: RawResponse,
  template?: string,
): ErrorBody | null {
  const what = `${method} ${path.slice(0, 120)}: ${res.status} ${res.text.slice(0, 300)}`;
  assert.ok(res.status >= 400 && res.status < 500, what);
  if (method === 'HEAD') {
    assert.equal(res.text, '', what);
    return null;
  }
  assert.match(res.headers['content-type'] ?? '', /^application\/json/, what);
  const body = JSON.parse(res.text) as ErrorBody;
  // The template names the operation when the hostile id does not look like one segment.
  assertMatchesOpenApi(method, template ?? path, res.status, body);
  return body;
}

describe('hostile requests on every route', () => {
  let srv: TestServer;
  const ids: Record<string, string> = {};

  before(async () => {
    srv = await startServer({ token: 's3cret' });
    const auth = { authorization: 'Bearer s3cret' };
    const vdi = await api<{ id: string }>(
      srv.url,
      'POST',
      '/v1/vdis',
      { name_label: 'hostile', virtual_size: MiB },
      auth,
    );
    ids.vdi = vdi.body.id;
    ids.sr = 'local';
    const download = await api<{ id: string; task_id: string }>(
      srv.url,
      'POST',
      '/v1/transfers',
      { vdi: ids.vdi, direction: 'download', format: 'raw' },
      auth,
    );
    assert.equal(download.status, 201, JSON.stringify(download.body));
    ids.id = download.body.id;
    ids.task = download.body.task_id;
  });
  after(() => srv.close());

  const auth = { authorization: 'Bearer s3cret' };

  test('openapi.yaml has the routes to walk', () => {
    assert.ok(operations.length > 30, `only ${operations.length} operations`);
  });

  for (const op of operations.filter((o) => /\{[^}]+\}/.test(o.template))) {
    test(`${op.method} ${op.template}: a malformed percent-encoding in the id is 400 INVALID_REQUEST`, async () => {
      for (const id of MALFORMED_IDS) {
        const path = op.template.replace(/\{[^}]+\}/, id);
        const { headers, body } = plausible(op.method, op.template);
        const res = await raw(srv.url, op.method, path, { ...auth, ...headers }, body);
        const error = assertClientError(op.method, path, res, op.template.replace(/\{[^}]+\}/, 'x'));
        assert.equal(res.status, 400, `${op.method} ${path}`);
        if (error) {
          assert.equal(error.error.code, 'INVALID_REQUEST');
          assert.match(error.error.message, /percent-encoding/);
        }
      }
    });

    test(`${op.method} ${op.template}: ids no resource has are refused with a JSON 4xx`, async () => {
      for (const id of ODD_IDS) {
        const path = op.template.replace(/\{[^}]+\}/, id);
        const { headers, body } = plausible(op.method, op.template);
        const res = await raw(srv.url, op.method, path, { ...auth, ...headers }, body);
        // OPTIONS on a tus upload describes the server, whatever the id.
        if (op.method === 'OPTIONS' && res.status === 204) continue;
        assertClientError(op.method, path, res, op.template.replace(/\{[^}]+\}/, 'x'));
      }
    });
  }

  for (const op of operations.filter((o) => o.query.length > 0 && ['GET', 'HEAD'].includes(o.method))) {
    test(`${op.method} ${op.template}: hostile query values never cause a 5xx`, async () => {
      const pathname = op.template.replace(/\{(\w+)\}/g, (_m, name: string) => ids[name] ?? ids.id);
      for (const name of op.query) {
        for (const value of HOSTILE_VALUES) {
          const path = `${pathname}?${name}=${value}`;
          const res = await raw(srv.url, op.method, path, auth);
          if (res.status < 400) {
            assert.ok(res.status < 300 || res.status === 304, `${op.method} ${path}: ${res.status}`);
            // A whole-image answer was started: a broken body would not show in the status.
            continue;
          }
          assertClientError(op.method, path, res);
        }
      }
    });
  }

  test('xapi import with a hostile vdi changes nothing and answers a JSON 4xx', async () => {
    for (const value of HOSTILE_VALUES) {
      const path = `/import_raw_vdi?vdi=${value}&format=raw`;
      const res = await raw(srv.url, 'PUT', path, auth, Buffer.alloc(512, 1));
      assertClientError('PUT', path, res);
    }
  });

  test('hostile Range headers on an export are 200, 206 or 416, never a 5xx', async () => {
    const ranges = [
      'bytes=abc',
      'bytes=5-1',
      'bytes=-0',
      'bytes=99999999999999999999-',
      'bytes=--1',
      'bytes=1-2-3',
      'items=0-1',
      `bytes=${'0-1,'.repeat(400)}0-1`,
      'bytes=0-0,-1',
      `bytes=${'9'.repeat(400)}-`,
    ];
    for (const path of [`/v1/vdis/${ids.vdi}/contents`, `/v1/transfers/${ids.id}/data`]) {
      for (const range of ranges) {
        for (const method of ['GET', 'HEAD']) {
          const res = await raw(srv.url, method, path, { ...auth, range, 'if-range': '"junk' });
          assert.ok([200, 206, 416].includes(res.status), `${method} ${path} Range: ${range}: ${res.status}`);
          if (res.status === 416) assertClientError(method, path, res);
        }
      }
    }
  });

  test('hostile Content-Range headers on a chunk are a JSON 4xx and write nothing', async () => {
    const fresh = (
      await api<{ id: string }>(
        srv.url,
        'POST',
        '/v1/vdis',
        { name_label: 'chunks', virtual_size: MiB },
        auth,
      )
    ).body;
    const upload = await api<{ id: string; url: string }>(
      srv.url,
      'POST',
      '/v1/transfers',
      { vdi: fresh.id, direction: 'upload', size: MiB },
      auth,
    );
    assert.equal(upload.status, 201, JSON.stringify(upload.body));
    const path = new URL(upload.body.url).pathname + new URL(upload.body.url).search;
    for (const contentRange of [
      'bytes 5-1/10',
      'bytes a-b/c',
      'bytes 0-99999999999999999999/100000000000000000000',
      'bytes */abc',
      'bytes 0-0/0',
      'bytes -1-5/10',
      'bytes 0-511/1048576, bytes 0-511/1048576',
      `bytes 0-511/${'9'.repeat(400)}`,
      'bytes 1048576-1049087/1048576',
    ]) {
      const res = await raw(
        srv.url,
        'PUT',
        path,
        { 'content-range': contentRange, 'content-type': 'application/octet-stream' },
        Buffer.alloc(512, 7),
      );
      assertClientError('PUT', path, res);
    }
    const state = await api<{ bytes_received: number }>(
      srv.url,
      'GET',
      `/v1/transfers/${upload.body.id}`,
      undefined,
      auth,
    );
    assert.equal(state.body.bytes_received, 0);
  });

  test('bodies in an encoding diskport cannot read are a JSON 4xx, never a 5xx', async () => {
    const json = JSON.stringify({ name_label: 'enc', virtual_size: MiB });
    for (const [encoding, body] of [
      ['br', 'garbage, not brotli'],
      ['deflate', 'garbage, not deflate'],
      ['gzip', 'garbage, not gzip'],
      ['zstd', json],
      ['gzip, br', gzipSync(json)],
      ['x-unknown', json],
    ] as const) {
      const res = await raw(
        srv.url,
        'POST',
        '/v1/vdis',
        { ...auth, 'content-type': 'application/json', 'content-encoding': encoding },
        body,
      );
      const error = assertClientError('POST', '/v1/vdis', res);
      assert.ok(['INVALID_REQUEST', 'UNSUPPORTED_MEDIA_TYPE', 'INVALID_JSON'].includes(error!.error.code));
    }
    // JSON that body-parser decodes is still read: gzip is fine.
    const gz = await raw(
      srv.url,
      'POST',
      '/v1/vdis',
      { ...auth, 'content-type': 'application/json', 'content-encoding': 'gzip' },
      gzipSync(json),
    );
    assert.equal(gz.status, 201, gz.text);
  });

  test('image bytes with a Content-Encoding are refused (415) before they land, on every upload route', async () => {
    const vdi = await api<{ id: string }>(
      srv.url,
      'POST',
      '/v1/vdis',
      { name_label: 'encoded upload', virtual_size: MiB },
      auth,
    );
    const before = await api<{ generation?: number }>(
      srv.url,
      'GET',
      `/v1/vdis/${vdi.body.id}`,
      undefined,
      auth,
    );
    const image = gzipSync(Buffer.alloc(MiB, 5));
    for (const [method, path, extra] of [
      ['PUT', `/v1/vdis/${vdi.body.id}/contents?format=raw`, {}],
      ['PUT', `/import_raw_vdi?vdi=${vdi.body.id}&format=raw`, {}],
      [
        'POST',
        '/v1/tus/',
        {
          'tus-resumable': '1.0.0',
          'upload-length': String(image.length),
          'upload-metadata': `vdi ${Buffer.from(vdi.body.id).toString('base64')}`,
          'content-type': 'application/offset+octet-stream',
        },
      ],
    ] as const) {
      const res = await raw(srv.url, method, path, { ...auth, 'content-encoding': 'gzip', ...extra }, image);
      const error = assertClientError(method, path, res);
      assert.equal(res.status, 415);
      assert.equal(error!.error.code, 'UNSUPPORTED_MEDIA_TYPE');
    }
    const after = await api<{ generation?: number }>(
      srv.url,
      'GET',
      `/v1/vdis/${vdi.body.id}`,
      undefined,
      auth,
    );
    assert.deepEqual(after.body, before.body, 'the VDI is unchanged');
  });

  test('the server is healthy after all of it', async () => {
    const health = await fetch(`${srv.url}/healthz`);
    assert.equal(health.status, 200);
    const list = await api(srv.url, 'GET', '/v1/vdis', undefined, auth);
    assert.equal(list.status, 200);
  });
});
