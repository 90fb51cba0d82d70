/**
 * node:test with a default timeout on every test and hook: the test scripts
 * resolve `node:test` here (register-test-timeout.ts), so a test that hangs
 * fails on its own after TEST_TIMEOUT_MS and the file goes on with the next.
 *
 * node's own --test-timeout cannot do this: it bounds a whole file, and a
 * describe's `timeout` bounds the whole suite, not each test in it. A test
 * that needs longer says so with its own `{ timeout }`, which wins.
 */
import nodeTest from 'node:test';

/** Generous: the machine is shared and loaded; a healthy test takes seconds. */
export const TEST_TIMEOUT_MS = 120_000;

type HookFn = typeof nodeTest.before;

function withDefault(options: unknown): nodeTest.TestOptions {
  return { timeout: TEST_TIMEOUT_MS, ...(options as nodeTest.TestOptions | undefined) };
}

/** test([name], [options], [fn]): the options, when given, come right before the function. */
function timed<T extends (...args: never[]) => unknown>(run: T): T {
  const wrapped = (...args: unknown[]) => {
    const name = typeof args[0] === 'string' ? [args.shift()] : [];
    const options = typeof args[0] === 'object' && args[0] !== null ? args.shift() : undefined;
    return (run as unknown as (...a: unknown[]) => Promise<void>)(...name, withDefault(options), ...args);
  };
  return Object.assign(wrapped, run) as T;
}

function timedHook(hook: HookFn): HookFn {
  return ((fn: unknown, options?: unknown) =>
    (hook as (...a: unknown[]) => void)(fn, withDefault(options))) as HookFn;
}

export const test = timed(nodeTest.test);
export const it = timed(nodeTest.it);
export const only = timed(nodeTest.only);
export const before = timedHook(nodeTest.before);
export const after = timedHook(nodeTest.after);
export const beforeEach = timedHook(nodeTest.beforeEach);
export const afterEach = timedHook(nodeTest.afterEach);
// Suites keep no timeout of their own: each test in them has one.
export const { describe, suite, skip, todo, mock, run } = nodeTest;
export default test;
