/**
 * A query parameter given twice is a 400 on every route, never a silent
 * default: `?format=qcow2&format=qcow2` once wrote a qcow2 container into a
 * VDI as raw disk bytes.
 */
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { openapiDocument } from '../src/http/openapi.js';
import { api, createVdi, execFileP, sha256File } from './helpers/api.js';
import { seededBytes, startServer, type TestServer, tempDir } from './helpers/server.js';

type ErrorBody = { error: { code: string; message: string; details?: Record<string, unknown> } };
type Param = { name?: string; in?: string; $ref?: string };

const MiB = 1024 * 1024;
const doc = openapiDocument as {
  paths: Record<string, Record<string, unknown> & { parameters?: Param[] }>;
  components: { parameters: Record<string, Param> };
};
const METHODS = ['get', 'put', 'post', 'patch', 'delete', 'head', 'options'];

function resolve(p: Param): Param {
  return p.$ref ? doc.components.parameters[p.$ref.split('/').pop()!] : p;
}

/** Every operation of openapi.yaml with the query parameters it takes. */
const operations = Object.entries(doc.paths)
  .flatMap(([template, item]) =>
    METHODS.filter((m) => item[m]).map((method) => {
      const op = item[method] as { parameters?: Param[] };
      const params = [...(item.parameters ?? []), ...(op.parameters ?? [])].map(resolve);
      return {
        method: method.toUpperCase(),
        template,
        query: params.filter((p) => p.in === 'query').map((p) => p.name!),
      };
    }),
  )
  .filter((op) => op.query.length > 0);

describe('a repeated query parameter', () => {
  let srv: TestServer;
  let dir: string;
  let vdi: string;
  before(async () => {
    srv = await startServer();
    dir = await tempDir();
    vdi = (await createVdi(srv.url, 4 * MiB)).id;
  });
  after(async () => {
    await srv.close();
    await fsp.rm(dir, { recursive: true, force: true });
  });

  test('openapi.yaml has routes with query parameters to walk', () => {
    assert.ok(operations.length >= 10, `only ${operations.length} operations take query parameters`);
  });

  for (const op of operations) {
    for (const name of op.query) {
      test(`${op.method} ${op.template}: ${name} twice (same or different values) is 400`, async () => {
        const pathname = op.template.replace(/\{[^}]+\}/g, vdi);
        for (const values of [
          ['raw', 'raw'],
          ['raw', 'qcow2'],
        ]) {
          const url = `${pathname}?${values.map((v) => `${name}=${v}`).join('&')}`;
          if (op.method === 'HEAD') {
            const res = await fetch(srv.url + url, { method: 'HEAD' });
            assert.equal(res.status, 400, `HEAD ${url}`);
            continue;
          }
          const res = await api<ErrorBody>(srv.url, op.method, url);
          assert.equal(res.status, 400, `${op.method} ${url}: ${JSON.stringify(res.body)}`);
          assert.equal(res.body.error.code, 'INVALID_REQUEST');
          assert.match(res.body.error.message, new RegExp(`'${name}' is given 2 times`));
          assert.deepEqual(res.body.error.details, { parameter: name });
        }
      });
    }
  }

  test('a qcow2 image sent with format=qcow2 twice is refused and the VDI keeps its bytes', async () => {
    const raw = path.join(dir, 'disk.raw');
    const qcow2 = path.join(dir, 'disk.qcow2');
    await fsp.writeFile(raw, seededBytes(4 * MiB, 7));
    await execFileP('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2]);
    const target = (await createVdi(srv.url, 4 * MiB)).id;
    const first = await fetch(`${srv.url}/v1/vdis/${target}/contents?format=raw`, {
      method: 'PUT',
      body: await fsp.readFile(raw),
    });
    assert.equal(first.status, 200);
    const generation = (await api<{ generation: number }>(srv.url, 'GET', `/v1/vdis/${target}`)).body
      .generation;
    for (const url of [
      `/v1/vdis/${target}/contents?format=qcow2&format=qcow2`,
      `/import_raw_vdi?vdi=${target}&format=qcow2&format=qcow2`,
      `/import_raw_vdi?vdi=${target}&vdi=${target}&format=qcow2`,
    ]) {
      const res = await fetch(srv.url + url, { method: 'PUT', body: await fsp.readFile(qcow2) });
      assert.equal(res.status, 400, url);
    }
    const after = (await api<{ generation: number }>(srv.url, 'GET', `/v1/vdis/${target}`)).body;
    assert.equal(after.generation, generation, 'nothing was committed');
    const out = path.join(dir, 'out.raw');
    await fsp.writeFile(
      out,
      Buffer.from(await (await fetch(`${srv.url}/v1/vdis/${target}/contents`)).arrayBuffer()),
    );
    assert.equal(await sha256File(out), await sha256File(raw));
  });
});
