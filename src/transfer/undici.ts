/**
 * undici, loaded at its first use: importing it took a fifth of the server's
 * start-up, and only pull, push and the CLI speak HTTP to other hosts.
 */
import { createRequire } from 'node:module';
import type * as Undici from 'undici';

let loaded: typeof Undici | undefined;

export function undici(): typeof Undici {
  loaded ??= createRequire(import.meta.url)('undici') as typeof Undici;
  return loaded;
}
