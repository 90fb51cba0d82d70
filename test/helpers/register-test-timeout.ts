/**
 * Loaded with `--import` by the test scripts: every `import ... from
 * 'node:test'` in a test file gets test-timeout.ts, node:test with a default
 * timeout per test (the module itself still reaches the real node:test).
 */
import { register } from 'node:module';

register('./test-timeout-hooks.ts', import.meta.url);
