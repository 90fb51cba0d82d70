/**
 * The thread that holds the PostgreSQL connection for storage/pg-db.ts: it
 * runs one request at a time (the caller is blocked until the answer) and
 * wakes the caller through the shared signal once the answer is posted.
 *
 * Why source text, run with `eval` and no loader: the caller blocks its
 * thread in Atomics.wait while the worker starts, and a worker that loads
 * through the parent's module hooks (tsx in tests and `npm run dev`) needs
 * the blocked thread to answer them: it would never start. Plain CommonJS
 * with `pg` required by its resolved path needs nothing from the caller.
 */
export const PG_WORKER_SOURCE = String.raw`
const { workerData } = require('node:worker_threads');
const { pgPath, url, port, signal, connectTimeoutMs, queryTimeoutMs } = workerData;
const pg = require(pgPath);

// INTEGER columns are BIGINT there (SQLite's are 64 bits): numbers, as better-sqlite3 gives them.
const types = {
  getTypeParser: (oid, format) => (oid === 20 ? (v) => Number(v) : pg.types.getTypeParser(oid, format)),
};

let client = null;
// Statement texts get a server-side name each: parsed once per connection.
const names = new Map();

async function connection() {
  if (client) return client;
  const c = new pg.Client({
    connectionString: url,
    connectionTimeoutMillis: connectTimeoutMs,
    query_timeout: queryTimeoutMs,
    types,
    application_name: 'diskport',
  });
  c.on('error', () => {
    if (client !== c) return;
    client = null;
    if (inTransaction) lostTransaction = true;
  });
  await c.connect();
  client = c;
  return c;
}

// Errors that mean the server is away, not that the statement was wrong.
function isUnavailable(err) {
  const code = typeof err?.code === 'string' ? err.code : '';
  if (code === '08P01') return false; // a protocol violation: the statement's fault
  if (/^(08|57P0|53300)/.test(code) || /^E[A-Z]+$/.test(code)) return true;
  return /Connection terminated|timeout|not queryable|ECONN/i.test(String(err?.message ?? ''));
}

// A transaction is BEGIN...COMMIT on one connection. If that connection is lost half-way, the
// server has rolled it back; a fresh connection must not run the rest of it, each statement
// committed alone (a transaction half applied). Until the caller's ROLLBACK (or its COMMIT,
// which fails) every statement of it fails as the lost one did.
let inTransaction = false;
let lostTransaction = false;

async function handle(req) {
  if (req.op === 'close') {
    const c = client;
    client = null;
    inTransaction = lostTransaction = false;
    if (c) await c.end().catch(() => {});
    return { ok: true, rows: [], changes: 0 };
  }
  const text = req.op === 'exec' ? req.text.trim() : '';
  if (lostTransaction) {
    if (text === 'ROLLBACK' || text === 'COMMIT') inTransaction = lostTransaction = false;
    if (text === 'ROLLBACK') return { ok: true, rows: [], changes: 0 };
    throw Object.assign(new Error('the connection was lost inside a transaction, which the server rolled back'), {
      code: '08006',
    });
  }
  const c = await connection();
  if (req.op === 'exec') {
    // Whatever its outcome, the transaction is over (a failed COMMIT is answered as unavailable).
    if (text === 'COMMIT' || text === 'ROLLBACK') inTransaction = false;
    await c.query(req.text);
    // Only once it began: a BEGIN that failed leaves no transaction for the caller to roll back.
    if (text === 'BEGIN') inTransaction = true;
    return { ok: true, rows: [], changes: 0 };
  }
  let name = names.get(req.text);
  if (!name) {
    name = 's' + names.size;
    names.set(req.text, name);
  }
  const res = await c.query({ name, text: req.text, values: req.values });
  return { ok: true, rows: res.rows, changes: res.rowCount ?? 0 };
}

async function serve(req) {
  let reply;
  try {
    reply = await handle(req);
  } catch (err) {
    const unavailable = isUnavailable(err);
    if (unavailable && client) {
      const lost = client;
      client = null;
      lost.end().catch(() => {});
    }
    if (unavailable && inTransaction) lostTransaction = true;
    reply = { ok: false, message: String(err?.message ?? err), code: err?.code, unavailable };
  }
  port.postMessage({ ...reply, id: req.id });
  Atomics.store(signal, 0, 1);
  Atomics.notify(signal, 0);
}

// One request at a time, in order: a caller that gave up waiting (a lost server) posts its next
// request while the last still runs; run beside it, two could open two connections, and the
// next statement of a transaction could run outside it.
let queue = Promise.resolve();
port.on('message', (req) => {
  queue = queue.then(() => serve(req));
});
`;
