import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import request from 'supertest';
import { api, createVdi } from './helpers/api.js';
import { assertMatchesOpenApi } from './helpers/openapi.js';
import { startServer, type TestServer } from './helpers/server.js';

describe('SRs and VDIs', () => {
  let srv: TestServer;
  before(async () => {
    srv = await startServer();
  });
  after(() => srv.close());

  test('the embedded default SR "local" is listed with its formats and space', async () => {
    const res = await request(srv.url).get('/v1/srs').expect(200);
    assertMatchesOpenApi('GET', '/v1/srs', 200, res.body);
    assert.equal(res.body.length, 1);
    const sr = res.body[0];
    assert.equal(sr.id, 'local');
    assert.ok(sr.supported_image_formats.includes('raw'));
    assert.ok(sr.free_space > 0 && sr.physical_size >= sr.free_space);
    const one = await request(srv.url).get('/v1/srs/local').expect(200);
    assert.deepEqual(one.body.id, 'local');
  });

  test('creates, reads, lists, renames, grows and deletes a VDI', async () => {
    const created = await request(srv.url)
      .post('/v1/vdis')
      .send({ name_label: 'web-01 root', name_description: 'root disk', virtual_size: 1024 * 1024 })
      .expect(201);
    assertMatchesOpenApi('POST', '/v1/vdis', 201, created.body);
    const id = created.body.id;
    assert.equal(created.headers.location, `/v1/vdis/${id}`);
    assert.equal(created.body.image_format, 'raw');
    assert.equal(created.body.physical_utilisation, 0, 'a new VDI is all hole');

    const got = await api(srv.url, 'GET', `/v1/vdis/${id}`);
    assert.equal(got.body.name_label, 'web-01 root');
    const list = await api<{ id: string }[]>(srv.url, 'GET', '/v1/vdis');
    assert.ok(list.body.some((v) => v.id === id));

    const renamed = await api(srv.url, 'PATCH', `/v1/vdis/${id}`, {
      name_label: 'web-01',
      virtual_size: 2 * 1024 * 1024,
    });
    assert.equal(renamed.status, 200);
    assert.equal(renamed.body.name_label, 'web-01');
    assert.equal(renamed.body.virtual_size, 2 * 1024 * 1024);

    const shrink = await api<{ error: { code: string } }>(srv.url, 'PATCH', `/v1/vdis/${id}`, {
      virtual_size: 512,
    });
    assert.equal(shrink.status, 400);
    assert.equal(shrink.body.error.code, 'SHRINK_NOT_ALLOWED');

    const del = await fetch(`${srv.url}/v1/vdis/${id}`, { method: 'DELETE' });
    assert.equal(del.status, 204);
    const gone = await api<{ error: { code: string } }>(srv.url, 'GET', `/v1/vdis/${id}`);
    assert.equal(gone.status, 404);
    assert.equal(gone.body.error.code, 'VDI_NOT_FOUND');
  });

  const badCreates: [string, unknown, RegExp][] = [
    ['virtual_size not a multiple of 512', { name_label: 'x', virtual_size: 1000 }, /multiple of 512/],
    ['virtual_size zero', { name_label: 'x', virtual_size: 0 }, /virtual_size/],
    ['virtual_size negative', { name_label: 'x', virtual_size: -512 }, /virtual_size/],
    ['virtual_size a string', { name_label: 'x', virtual_size: '1024' }, /integer/],
    ['an unknown field', { name_label: 'x', virtual_size: 1024, colour: 'blue' }, /unknown field 'colour'/],
    ['no name_label', { virtual_size: 1024 }, /name_label/],
    ['an array body', [1, 2], /object/],
  ];
  for (const [what, body, message] of badCreates) {
    test(`refuses a VDI with ${what} (400, says why)`, async () => {
      const res = await api<{ error: { code: string; message: string } }>(srv.url, 'POST', '/v1/vdis', body);
      assert.equal(res.status, 400);
      assert.equal(res.body.error.code, 'INVALID_REQUEST');
      assert.match(res.body.error.message, message);
    });
  }

  test('malformed JSON gets 400 INVALID_JSON', async () => {
    const res = await api<{ error: { code: string } }>(
      srv.url,
      'POST',
      '/v1/vdis',
      '{"name_label": "x", virtual_size',
    );
    assert.equal(res.status, 400);
    assert.equal(res.body.error.code, 'INVALID_JSON');
  });

  test('a JSON body over 1 MiB is 413 BODY_TOO_LARGE, and no VDI is made', async () => {
    const before = await api<unknown[]>(srv.url, 'GET', '/v1/vdis');
    const res = await api<{ error: { code: string } }>(srv.url, 'POST', '/v1/vdis', {
      name_label: 'x'.repeat(1024 * 1024 + 1),
      virtual_size: 1024,
    });
    assert.equal(res.status, 413);
    assert.equal(res.body.error.code, 'BODY_TOO_LARGE');
    const after = await api<unknown[]>(srv.url, 'GET', '/v1/vdis');
    assert.equal(after.body.length, before.body.length);
  });

  test('a JSON body in a charset or Content-Encoding diskport does not read is 415 UNSUPPORTED_MEDIA_TYPE saying what to send', async () => {
    const body = JSON.stringify({ name_label: 'x', virtual_size: 1024 });
    for (const [headers, hint] of [
      [{ 'content-type': 'application/json; charset=latin1' }, /UTF-8/],
      [
        { 'content-type': 'application/json', 'content-encoding': 'compress' },
        /identity, gzip, deflate or br/,
      ],
    ] as const) {
      const res = await api<{ error: { code: string; message: string } }>(srv.url, 'POST', '/v1/vdis', body, {
        ...headers,
      });
      assert.equal(res.status, 415, JSON.stringify(headers));
      assert.equal(res.body.error.code, 'UNSUPPORTED_MEDIA_TYPE');
      assert.match(res.body.error.message, hint);
    }
  });

  test('a body without a JSON content type is refused with a hint', async () => {
    const res = await fetch(`${srv.url}/v1/vdis`, { method: 'POST', body: 'name_label=x' });
    assert.equal(res.status, 400);
    const body = (await res.json()) as { error: { message: string } };
    assert.match(body.error.message, /JSON body is required/);
  });

  test('an image_format the SR does not list gives FORMAT_NOT_SUPPORTED naming the SR formats', async () => {
    const res = await api<{
      error: { code: string; message: string; details: { supported_image_formats: string[] } };
    }>(srv.url, 'POST', '/v1/vdis', { name_label: 'x', virtual_size: 1024, image_format: 'vmdk' });
    assert.equal(res.status, 400);
    assert.equal(res.body.error.code, 'FORMAT_NOT_SUPPORTED');
    assert.ok(res.body.error.details.supported_image_formats.includes('raw'));
    assert.match(res.body.error.message, /raw/);
  });

  test('unknown ids are 404 with a code naming the kind', async () => {
    for (const [path, code] of [
      ['/v1/vdis/nope', 'VDI_NOT_FOUND'],
      ['/v1/srs/nope', 'SR_NOT_FOUND'],
      ['/v1/tasks/nope', 'TASK_NOT_FOUND'],
      ['/v1/vdis/nope/contents', 'VDI_NOT_FOUND'],
    ] as const) {
      const res = await api<{ error: { code: string } }>(srv.url, 'GET', path);
      assert.equal(res.status, 404, path);
      assert.equal(res.body.error.code, code, path);
    }
    const unknownRoute = await api<{ error: { code: string } }>(srv.url, 'GET', '/v1/nothing-here');
    assert.equal(unknownRoute.status, 404);
    assert.equal(unknownRoute.body.error.code, 'NOT_FOUND');
  });

  test('every response carries a request id, echoed when the client sends one', async () => {
    const res = await request(srv.url).get('/healthz').set('X-Request-Id', 'trace-42').expect(200);
    assert.equal(res.headers['x-request-id'], 'trace-42');
    const fresh = await request(srv.url).get('/healthz').expect(200);
    assert.match(fresh.headers['x-request-id'], /^[0-9a-f-]{36}$/);
  });

  test('deleting a VDI that an import holds is refused with VDI_BUSY', async () => {
    const vdi = await createVdi(srv.url, 1024 * 1024);
    const release = srv.services.vdis.locks.acquire(vdi.id, 'test import');
    try {
      const res = await api<{ error: { code: string } }>(srv.url, 'DELETE', `/v1/vdis/${vdi.id}`);
      assert.equal(res.status, 409);
      assert.equal(res.body.error.code, 'VDI_BUSY');
    } finally {
      release();
    }
  });
});

describe('token', () => {
  let srv: TestServer;
  before(async () => {
    srv = await startServer({ token: 's3cret' });
  });
  after(() => srv.close());

  test('management calls need the bearer token; healthz does not', async () => {
    assert.equal((await fetch(`${srv.url}/healthz`)).status, 200);
    const none = await api<{ error: { code: string } }>(srv.url, 'GET', '/v1/vdis');
    assert.equal(none.status, 401);
    assert.equal(none.body.error.code, 'TOKEN_REQUIRED');
    const wrong = await api<{ error: { code: string } }>(srv.url, 'GET', '/v1/vdis', undefined, {
      authorization: 'Bearer nope',
    });
    assert.equal(wrong.status, 403);
    assert.equal(wrong.body.error.code, 'TOKEN_INVALID');
    const right = await api(srv.url, 'GET', '/v1/vdis', undefined, { authorization: 'Bearer s3cret' });
    assert.equal(right.status, 200);
  });
});
