/**
 * Lists page newest first with ?limit= and an opaque ?cursor= (a Link
 * rel="next" header); finished tasks are pruned past their retention; a
 * ranged read leaves nothing behind in the store.
 */
import assert from 'node:assert/strict';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { api, createVdi, type JsonResponse } from './helpers/api.js';
import { startServer, type TestServer } from './helpers/server.js';

interface Task {
  id: string;
  type: string;
  status: string;
  created_at: string;
}
interface ErrorBody {
  error: { code: string; message: string };
}

const MiB = 1024 * 1024;

async function importTask(base: string, vdi: string): Promise<string> {
  const res = await fetch(`${base}/v1/vdis/${vdi}/contents?format=raw`, {
    method: 'PUT',
    body: Buffer.alloc(4096, 7),
  });
  assert.equal(res.status, 200);
  return ((await res.json()) as Task).id;
}

/** Follows the next links from `first`, calling `between` after each page; returns every id seen, in order. */
async function walk(base: string, first: string, between: () => Promise<unknown> = async () => {}) {
  const ids: string[] = [];
  let url: string | undefined = first;
  let pages = 0;
  while (url) {
    const res: JsonResponse<{ id: string }[]> = await api<{ id: string }[]>(base, 'GET', url);
    assert.equal(res.status, 200, JSON.stringify(res.body));
    ids.push(...res.body.map((t) => t.id));
    pages++;
    const link = res.headers.get('link');
    url = link ? /^<([^>]+)>; rel="next"$/.exec(link)?.[1] : undefined;
    if (link) assert.ok(url, `a next link: ${link}`);
    await between();
  }
  return { ids, pages };
}

describe('lists page newest first, nothing cut silently', () => {
  let srv: TestServer;
  let vdi: string;
  const created: string[] = [];
  before(async () => {
    srv = await startServer();
    vdi = (await createVdi(srv.url, MiB)).id;
    for (let i = 0; i < 23; i++) created.push(await importTask(srv.url, vdi));
  });
  after(() => srv.close());

  test('a walk of the tasks returns each task once, newest first, while new tasks are created', async () => {
    const during: string[] = [];
    const { ids, pages } = await walk(srv.url, `/v1/tasks?vdi=${vdi}&type=import&limit=5`, async () => {
      during.push(await importTask(srv.url, vdi));
    });
    assert.equal(pages, 5, '23 tasks in pages of 5');
    assert.deepEqual(ids, [...created].reverse(), 'every task that existed, once, newest first');
    assert.ok(
      during.every((id) => !ids.includes(id)),
      'tasks created during the walk are newer than its cursor',
    );
  });

  test('without a limit a page holds 100 and says there is more', async () => {
    const many = (await createVdi(srv.url, MiB)).id;
    for (let i = 0; i < 101; i++) await importTask(srv.url, many);
    const first = await api<Task[]>(srv.url, 'GET', `/v1/tasks?vdi=${many}`);
    assert.equal(first.body.length, 100);
    assert.match(first.headers.get('link') ?? '', /rel="next"/);
    const { ids } = await walk(srv.url, `/v1/tasks?vdi=${many}&limit=1000`);
    assert.equal(ids.length, 101, 'limit=1000 has it all in one page');
  });

  test('tasks filter by status, VDI and type', async () => {
    const imports = await api<Task[]>(
      srv.url,
      'GET',
      `/v1/tasks?vdi=${vdi}&type=import&status=success&limit=3`,
    );
    assert.equal(imports.body.length, 3);
    assert.ok(imports.body.every((t) => t.type === 'import' && t.status === 'success'));
    const none = await api<Task[]>(srv.url, 'GET', `/v1/tasks?vdi=${vdi}&type=checksum`);
    assert.deepEqual(none.body, []);
    assert.equal(none.headers.get('link'), null);
  });

  test('VDIs and transfers page the same way', async () => {
    const vdis: string[] = [];
    for (let i = 0; i < 7; i++) vdis.push((await createVdi(srv.url, MiB)).id);
    const { ids } = await walk(srv.url, '/v1/vdis?limit=3');
    assert.deepEqual(ids.slice(0, 7), [...vdis].reverse(), 'newest VDIs first');
    assert.equal(new Set(ids).size, ids.length, 'each VDI once');

    const sessions: string[] = [];
    for (const id of vdis.slice(0, 5)) {
      const t = await api<{ id: string }>(srv.url, 'POST', '/v1/transfers', {
        vdi: id,
        direction: 'download',
        format: 'raw',
      });
      assert.equal(t.status, 201);
      sessions.push(t.body.id);
    }
    const walked = await walk(srv.url, '/v1/transfers?limit=2');
    assert.deepEqual(walked.ids.slice(0, 5), [...sessions].reverse(), 'newest sessions first');
    assert.equal(new Set(walked.ids).size, walked.ids.length, 'each session once');
  });

  test('a bad limit or cursor is a 400 that says what to send', async () => {
    for (const limit of ['0', '1001', 'ten', '-1', '2.5']) {
      const res = await api<ErrorBody>(srv.url, 'GET', `/v1/tasks?limit=${limit}`);
      assert.equal(res.status, 400, `limit=${limit}`);
      assert.match(res.body.error.message, /limit must be a whole number from 1 to 1000/);
    }
    for (const route of ['/v1/tasks', '/v1/vdis', '/v1/transfers']) {
      const res = await api<ErrorBody>(srv.url, 'GET', `${route}?cursor=bm90LWEtY3Vyc29y`);
      assert.equal(res.status, 400, route);
      assert.equal(res.body.error.code, 'INVALID_CURSOR');
    }
  });
});

describe('task retention', () => {
  test('finished tasks past the count or the age are pruned at start-up; running ones never', async () => {
    let srv = await startServer({ config: { taskRetention: { maxAgeSeconds: 3600, maxCount: 3 } } });
    const { dataDir } = srv;
    const vdi = (await createVdi(srv.url, MiB)).id;
    const finished: string[] = [];
    for (let i = 0; i < 6; i++) finished.push(await importTask(srv.url, vdi));
    const other = (await createVdi(srv.url, MiB)).id;
    const session = await api<{ task_id: string }>(srv.url, 'POST', '/v1/transfers', {
      vdi: other,
      direction: 'upload',
      format: 'raw',
      size: MiB,
    });
    assert.equal(session.status, 201);
    await srv.close();

    srv = await startServer({ dataDir, config: { taskRetention: { maxAgeSeconds: 3600, maxCount: 3 } } });
    let left = (await api<Task[]>(srv.url, 'GET', '/v1/tasks')).body.map((t) => t.id);
    assert.deepEqual(
      left,
      [session.body.task_id, ...finished.slice(3).reverse()],
      'the 3 newest finished and the running one',
    );
    await srv.close();

    // An age of 0 s: every finished task is past it, the running session's task stays.
    srv = await startServer({ dataDir, config: { taskRetention: { maxAgeSeconds: 0, maxCount: 3 } } });
    left = (await api<Task[]>(srv.url, 'GET', '/v1/tasks')).body.map((t) => t.id);
    assert.deepEqual(left, [session.body.task_id]);
    const gone = await api<ErrorBody>(srv.url, 'GET', `/v1/tasks/${finished[5]}`);
    assert.equal(gone.status, 404);
    await srv.close();
  });
});

describe('ranged reads leave nothing behind', () => {
  test('2,000 ranged GETs create no task and write nothing to the database', async () => {
    // A node on PostgreSQL records its heartbeat every few seconds; none falls within this test.
    const srv = await startServer({ config: { heartbeatMs: 3_600_000, nodeTimeoutMs: 7_200_000 } });
    try {
      const vdi = (await createVdi(srv.url, 4 * MiB)).id;
      const put = await fetch(`${srv.url}/v1/vdis/${vdi}/contents`, {
        method: 'PUT',
        body: Buffer.alloc(4 * MiB, 9),
      });
      assert.equal(put.status, 200);
      const db = path.join(srv.dataDir, 'diskport.sqlite');
      const size = async () => {
        const sizes = await Promise.all(
          ['', '-wal'].map((s) =>
            fsp.stat(db + s).then(
              (st) => st.size,
              () => 0,
            ),
          ),
        );
        return sizes[0] + sizes[1];
      };
      const tasksBefore = (await api<Task[]>(srv.url, 'GET', '/v1/tasks?limit=1000')).body.length;
      const bytesBefore = await size();
      const writesBefore = srv.services.db.changeCount();
      for (let i = 0; i < 2000; i += 8) {
        await Promise.all(
          Array.from({ length: 8 }, async (_, j) => {
            const start = ((i + j) * 65536) % (4 * MiB);
            const res = await fetch(
              `${srv.url}/v1/vdis/${vdi}/contents?format=${['raw', 'vhd', 'qcow2'][j % 3]}`,
              {
                headers: { range: `bytes=${start}-${start + 65535}` },
              },
            );
            assert.equal(res.status, 206);
            assert.equal((await res.arrayBuffer()).byteLength, 65536);
          }),
        );
      }
      assert.equal((await api<Task[]>(srv.url, 'GET', '/v1/tasks?limit=1000')).body.length, tasksBefore);
      assert.equal(srv.services.db.changeCount(), writesBefore, 'no statement wrote to the database');
      // SQLite's file and WAL (absent on PostgreSQL)
      assert.equal(await size(), bytesBefore, 'no byte written to the database');
    } finally {
      await srv.close();
    }
  });
});
