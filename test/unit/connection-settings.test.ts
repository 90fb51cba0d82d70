/** The connection settings: each has a flag and an environment variable (flags win), with sane bounds. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { nodeUrlOf, parseConfig, parseDurationMs } from '../../src/config.js';

test('durations in milliseconds: ms, s, m, or bare seconds; never 0', () => {
  assert.equal(parseDurationMs('500ms'), 500);
  assert.equal(parseDurationMs('30s'), 30_000);
  assert.equal(parseDurationMs('2m'), 120_000);
  assert.equal(parseDurationMs('7'), 7000);
  for (const bad of ['0', '0ms', 'soon', '-1s', '1.5s']) assert.throws(() => parseDurationMs(bad), bad);
});

test('defaults, environment, and flags over environment', () => {
  const defaults = parseConfig([], {});
  assert.equal(defaults.maxConnections, 4096);
  assert.equal(defaults.firstRequestTimeoutMs, 30_000);
  assert.equal(defaults.headersTimeoutMs, 60_000);
  const env = {
    DISKPORT_MAX_CONNECTIONS: '100',
    DISKPORT_FIRST_REQUEST_TIMEOUT: '5s',
    DISKPORT_HEADERS_TIMEOUT: '10s',
  };
  const fromEnv = parseConfig([], env);
  assert.deepEqual(
    [fromEnv.maxConnections, fromEnv.firstRequestTimeoutMs, fromEnv.headersTimeoutMs],
    [100, 5000, 10_000],
  );
  const flags = parseConfig(
    ['--max-connections', '7', '--first-request-timeout', '250ms', '--headers-timeout', '1s'],
    env,
  );
  assert.deepEqual(
    [flags.maxConnections, flags.firstRequestTimeoutMs, flags.headersTimeoutMs],
    [7, 250, 1000],
  );
  assert.throws(() => parseConfig(['--max-connections', '0'], {}));
});

test('--node-url (DISKPORT_NODE_URL): where other nodes reach this one; by default the listening address', () => {
  assert.equal(parseConfig(['--node-url', 'http://10.0.0.5:8080/'], {}).nodeUrl, 'http://10.0.0.5:8080');
  assert.equal(parseConfig([], { DISKPORT_NODE_URL: 'http://node2:8080' }).nodeUrl, 'http://node2:8080');
  assert.equal(parseConfig([], {}).nodeUrl, undefined);
  for (const bad of ['node2:8080', 'ftp://node2', 'http://node2/?x=1']) {
    assert.throws(() => parseConfig(['--node-url', bad], {}), bad);
  }
  // A wildcard says nothing to another machine: its hostname does.
  assert.equal(nodeUrlOf('0.0.0.0', 8080, 'host-a'), 'http://host-a:8080');
  assert.equal(nodeUrlOf('::', 8080, 'host-a'), 'http://host-a:8080');
  assert.equal(nodeUrlOf('127.0.0.1', 9000, 'host-a'), 'http://127.0.0.1:9000');
  assert.equal(nodeUrlOf('fd00::5', 9000, 'host-a'), 'http://[fd00::5]:9000');
});
