/**
 * The one retry policy of the transfer API's clients (push's sender, the
 * CLI) and of pull: which failures are tried again, and how long to wait.
 * Pure: no server, no network.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  backoffDelay,
  HttpError,
  isNetworkError,
  isTransient,
  isTransientStatus,
  type RetryPolicy,
  SERVER_RETRY,
  withRetry,
} from '../../src/transfer/retry-policy.js';

describe('which answers are tried again', () => {
  const cases: [status: number, code: string | undefined, transient: boolean, why: string][] = [
    [500, 'INTERNAL_ERROR', true, 'a server error may pass'],
    [502, undefined, true, 'a proxy in between lost the server'],
    [503, undefined, true, 'unavailable for now'],
    [504, undefined, true, 'a proxy timed out'],
    [501, undefined, false, 'not implemented: asking again changes nothing'],
    [507, 'INSUFFICIENT_SPACE', false, 'out of space: someone must free space first'],
    [507, undefined, false, 'out of space, whatever the body'],
    [408, undefined, true, 'the server timed the request out'],
    [429, undefined, true, 'too many requests: later'],
    [400, 'MALFORMED_IMAGE', false, 'the image is wrong'],
    [400, 'CHUNK_INCOMPLETE', true, 'the connection broke under the chunk'],
    [400, 'CLIENT_DISCONNECTED', true, 'the connection broke'],
    [409, 'TRANSFER_BUSY', true, 'writes still landing: finalize again shortly'],
    [409, 'VDI_BUSY', false, 'another writer holds the VDI'],
    [409, 'TRANSFER_INCOMPLETE', false, 'bytes are missing: the caller sends them'],
    [401, 'TOKEN_REQUIRED', false, 'a token is needed'],
    [403, 'TOKEN_INVALID', false, 'the token is wrong'],
    [404, 'NOT_FOUND', false, 'no such transfer'],
    [413, 'CHUNK_PAST_END', false, 'past the end'],
    [416, undefined, false, 'a range outside the image'],
  ];
  for (const [status, code, transient, why] of cases) {
    test(`${status} ${code ?? '(no code)'}: ${transient ? 'retried' : 'an answer'} (${why})`, () => {
      assert.equal(isTransientStatus(status, code), transient);
      assert.equal(isTransient(new HttpError(status, code ?? `HTTP_${status}`, why)), transient);
    });
  }
});

describe('which thrown errors are the network failing', () => {
  const withCode = (code: string) => Object.assign(new Error(code), { code });
  const cases: [name: string, err: unknown, network: boolean][] = [
    ['a refused connection', withCode('ECONNREFUSED'), true],
    ['a reset', withCode('ECONNRESET'), true],
    ['a DNS failure', withCode('EAI_AGAIN'), true],
    ["undici's socket closed early", withCode('UND_ERR_SOCKET'), true],
    ["undici's headers timeout", withCode('UND_ERR_HEADERS_TIMEOUT'), true],
    ['a reset wrapped as the cause', new Error('fetch failed', { cause: withCode('ECONNRESET') }), true],
    ['a local file error', withCode('ENOENT'), false],
    ['a plain error', new Error('something else'), false],
    ['not an error', 'ECONNRESET', false],
  ];
  for (const [name, err, network] of cases) {
    test(`${name}: ${network ? 'retried' : 'not retried'}`, () => {
      assert.equal(isNetworkError(err), network);
      assert.equal(isTransient(err), network);
    });
  }
});

describe('how long to wait', () => {
  const policy: RetryPolicy = { retries: 10, baseDelayMs: 500, maxDelayMs: 30_000, maxElapsedMs: 600_000 };
  const cases: [attempt: number, low: number, high: number][] = [
    [1, 250, 500],
    [2, 500, 1000],
    [3, 1000, 2000],
    [6, 8000, 16_000],
    [7, 15_000, 30_000],
    [20, 15_000, 30_000],
  ];
  for (const [attempt, low, high] of cases) {
    test(`attempt ${attempt}: between ${low} and ${high} ms, doubling, capped`, () => {
      assert.equal(
        backoffDelay(policy, attempt, () => 0),
        low,
      );
      assert.equal(
        backoffDelay(policy, attempt, () => 1),
        high,
      );
      const d = backoffDelay(policy, attempt);
      assert.ok(d >= low && d <= high, `${d}`);
    });
  }

  test("pull and push's policy: 250 ms doubling, capped at 8 s, 5 retries", () => {
    assert.equal(
      backoffDelay(SERVER_RETRY, 1, () => 1),
      250,
    );
    assert.equal(
      backoffDelay(SERVER_RETRY, 10, () => 1),
      8000,
    );
    assert.equal(SERVER_RETRY.retries, 5);
  });
});

describe('withRetry', () => {
  const fast: RetryPolicy = { retries: 3, baseDelayMs: 1, maxDelayMs: 2, maxElapsedMs: 60_000 };
  const reset = () => Object.assign(new Error('reset'), { code: 'ECONNRESET' });

  test('tries a transient failure again until it succeeds', async () => {
    let n = 0;
    const got = await withRetry(fast, async () => {
      if (++n < 3) throw reset();
      return 'ok';
    });
    assert.equal(got, 'ok');
    assert.equal(n, 3);
  });

  test('takes a 507 as the answer: one attempt', async () => {
    let n = 0;
    await assert.rejects(
      withRetry(fast, async () => {
        n++;
        throw new HttpError(507, 'INSUFFICIENT_SPACE', 'no space left for the upload');
      }),
      (err) => err instanceof HttpError && err.status === 507,
    );
    assert.equal(n, 1);
  });

  test('gives up after `retries` failures in a row, and progress starts the count again', async () => {
    let n = 0;
    await assert.rejects(
      withRetry(fast, async () => {
        n++;
        throw reset();
      }),
      /gave up after 4 attempts/,
    );
    assert.equal(n, 4);
    let m = 0;
    const got = await withRetry(fast, async (_attempt, progressed) => {
      // Seven failures, but never more than two in a row without progress.
      if (++m < 8) {
        if (m % 2 === 0) progressed();
        throw reset();
      }
      return m;
    });
    assert.equal(got, 8);
  });

  test('an aborted signal ends the wait and the loop with its reason', async () => {
    const abort = new AbortController();
    const reason = new Error('stopped');
    let n = 0;
    const started = Date.now();
    await assert.rejects(
      withRetry({ ...fast, baseDelayMs: 60_000, maxDelayMs: 60_000, signal: abort.signal }, async () => {
        if (++n === 1) setTimeout(() => abort.abort(reason), 10);
        throw reset();
      }),
      (err) => err === reason,
    );
    assert.equal(n, 1);
    assert.ok(Date.now() - started < 5000);
  });
});
