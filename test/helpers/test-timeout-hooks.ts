/** Module resolution hook (see register-test-timeout.ts): `node:test` means test-timeout.ts. */
const WRAPPER = new URL('./test-timeout.ts', import.meta.url).href;

type Context = { parentURL?: string };
type Resolve = (
  specifier: string,
  context: Context,
  next: (specifier: string, context: Context) => Promise<unknown>,
) => Promise<unknown>;

export const resolve: Resolve = (specifier, context, next) =>
  specifier === 'node:test' && context.parentURL !== WRAPPER
    ? next(WRAPPER, context)
    : next(specifier, context);
