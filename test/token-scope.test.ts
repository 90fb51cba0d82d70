/**
 * A transfer's token is good for that transfer and nothing else, whether or
 * not the service has a management token: with one transfer's token, another
 * transfer (upload, download, or a tus upload, which is a transfer too)
 * cannot be read, written, zeroed, finalized or cancelled, as `?token=` or as
 * a Bearer token; and where a management token guards tus, the xapi aliases
 * and the rest of /v1, a transfer token opens none of them. After every
 * attempt, the other transfers and their VDI are exactly as they were.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { api, type TransferJson } from './helpers/api.js';
import { startServer, type TestServer } from './helpers/server.js';

const MiB = 1024 * 1024;
const TUS = { 'tus-resumable': '1.0.0' };

type ErrorBody = { error: { code: string } };
type Vdi = { id: string; generation: number };

for (const managementToken of [undefined, 'admin-secret']) {
  describe(`transfer tokens ${managementToken ? 'with' : 'without'} a management token`, () => {
    let srv: TestServer;
    const admin: Record<string, string> = managementToken
      ? { authorization: `Bearer ${managementToken}` }
      : {};
    let mine: TransferJson;
    let vdiB: Vdi;
    let upload: TransferJson;
    let download: TransferJson;
    let tusId: string;

    async function create(body: Record<string, unknown>): Promise<TransferJson> {
      const res = await api<TransferJson>(srv.url, 'POST', '/v1/transfers', body, admin);
      assert.equal(res.status, 201, JSON.stringify(res.body));
      return res.body;
    }

    before(async () => {
      srv = await startServer({ token: managementToken });
      const vdi = async () =>
        (await api<Vdi>(srv.url, 'POST', '/v1/vdis', { name_label: 'scope', virtual_size: MiB }, admin)).body;
      const vdiA = await vdi();
      vdiB = await vdi();
      const vdiC = await vdi();
      mine = await create({ vdi: vdiA.id, direction: 'upload', size: MiB });
      upload = await create({ vdi: vdiB.id, direction: 'upload', size: MiB });
      download = await create({ vdi: vdiA.id, direction: 'download', format: 'raw' });
      const tus = await fetch(`${srv.url}/v1/tus/`, {
        method: 'POST',
        headers: {
          ...TUS,
          ...admin,
          'upload-length': String(MiB),
          'upload-metadata': `vdi ${Buffer.from(vdiC.id).toString('base64')}`,
        },
      });
      assert.equal(tus.status, 201);
      tusId = tus.headers.get('location')!.split('/').pop()!;
    });
    after(() => srv.close());

    /** The ways a client presents `token`: in the query, or as a Bearer token. */
    const presented = (token: string) => [
      { how: '?token=', query: `token=${token}`, headers: {} as Record<string, string> },
      { how: 'Bearer', query: '', headers: { authorization: `Bearer ${token}` } },
    ];
    const withQuery = (path: string, query: string) =>
      query ? `${path}${path.includes('?') ? '&' : '?'}${query}` : path;

    test('the token works on its own transfer (so a refusal below is about scope)', async () => {
      for (const p of presented(mine.token)) {
        const res = await api<TransferJson>(
          srv.url,
          'GET',
          withQuery(`/v1/transfers/${mine.id}`, p.query),
          undefined,
          p.headers,
        );
        assert.equal(res.status, 200, p.how);
      }
    });

    test("another transfer's routes refuse it with 403 TOKEN_INVALID", async () => {
      const chunk = { 'content-range': `bytes 0-511/${MiB}`, 'content-type': 'application/octet-stream' };
      for (const target of [upload.id, download.id, tusId]) {
        for (const p of presented(mine.token)) {
          const attempts: [string, string, unknown, Record<string, string>][] = [
            ['GET', `/v1/transfers/${target}`, undefined, {}],
            ['PUT', `/v1/transfers/${target}/data`, Buffer.alloc(512, 1).toString('latin1'), chunk],
            ['PATCH', `/v1/transfers/${target}/data`, { op: 'zero', offset: 0, size: 512 }, {}],
            ['GET', `/v1/transfers/${target}/data`, undefined, {}],
            ['POST', `/v1/transfers/${target}/finalize`, undefined, {}],
            ['DELETE', `/v1/transfers/${target}`, undefined, {}],
          ];
          for (const [method, path, body, headers] of attempts) {
            const res = await api<ErrorBody>(srv.url, method, withQuery(path, p.query), body, {
              ...headers,
              ...p.headers,
            });
            assert.equal(res.status, 403, `${method} ${path} (${p.how}): ${JSON.stringify(res.body)}`);
            assert.equal(res.body.error.code, 'TOKEN_INVALID');
          }
          const head = await fetch(`${srv.url}${withQuery(`/v1/transfers/${target}/data`, p.query)}`, {
            method: 'HEAD',
            headers: p.headers,
          });
          assert.equal(head.status, 403, `HEAD data (${p.how})`);
        }
      }
    });

    test('tus, the xapi aliases and the rest of /v1 take no transfer token', {
      skip: !managementToken && 'without a management token these need no credential at all',
    }, async () => {
      const basic = `Basic ${Buffer.from(`root:${mine.token}`).toString('base64')}`;
      for (const p of presented(mine.token)) {
        for (const [method, extra] of [
          ['HEAD', {}],
          ['PATCH', { 'upload-offset': '0', 'content-type': 'application/offset+octet-stream' }],
          ['DELETE', {}],
        ] as const) {
          const res = await fetch(`${srv.url}${withQuery(`/v1/tus/${tusId}`, p.query)}`, {
            method,
            headers: { ...TUS, ...extra, ...p.headers },
            body: method === 'PATCH' ? new Uint8Array(512) : undefined,
          });
          assert.ok([401, 403].includes(res.status), `${method} /v1/tus/{id} (${p.how}): ${res.status}`);
        }
        for (const path of [
          `/v1/vdis/${vdiB.id}`,
          `/v1/vdis/${vdiB.id}/contents`,
          '/v1/transfers',
          '/v1/tasks',
        ]) {
          const res = await api(srv.url, 'GET', withQuery(path, p.query), undefined, p.headers);
          assert.ok([401, 403].includes(res.status), `GET ${path} (${p.how}): ${res.status}`);
        }
        const put = await fetch(
          `${srv.url}${withQuery(`/v1/vdis/${vdiB.id}/contents?format=raw`, p.query)}`,
          {
            method: 'PUT',
            headers: p.headers,
            body: new Uint8Array(512).fill(1),
          },
        );
        assert.ok([401, 403].includes(put.status), `PUT contents (${p.how}): ${put.status}`);
      }
      const credentials: { query: string; headers: Record<string, string> }[] = [
        { query: `session_id=${mine.token}`, headers: {} },
        { query: '', headers: { authorization: `Bearer ${mine.token}` } },
        { query: '', headers: { authorization: basic } },
      ];
      for (const credential of credentials) {
        const exp = await fetch(`${srv.url}/export_raw_vdi?vdi=${vdiB.id}&${credential.query}`, {
          headers: credential.headers,
        });
        assert.equal(exp.status, 403, `export_raw_vdi ${JSON.stringify(credential)}`);
        const imp = await fetch(`${srv.url}/import_raw_vdi?vdi=${vdiB.id}&${credential.query}`, {
          method: 'PUT',
          headers: credential.headers,
          body: new Uint8Array(512).fill(1),
        });
        assert.equal(imp.status, 403, `import_raw_vdi ${JSON.stringify(credential)}`);
      }
    });

    test('after every attempt, the other transfers and their VDI are as they were', async () => {
      for (const t of [upload, download]) {
        const now = await api<TransferJson>(srv.url, 'GET', `/v1/transfers/${t.id}?token=${t.token}`);
        assert.equal(now.body.state, 'open');
        assert.equal(now.body.bytes_received ?? 0, 0);
      }
      const tusHead = await fetch(`${srv.url}/v1/tus/${tusId}`, {
        method: 'HEAD',
        headers: { ...TUS, ...admin },
      });
      assert.equal(tusHead.status, 200);
      assert.equal(tusHead.headers.get('upload-offset'), '0');
      const b = await api<Vdi>(srv.url, 'GET', `/v1/vdis/${vdiB.id}`, undefined, admin);
      assert.equal(b.body.generation, vdiB.generation);
    });
  });
}
