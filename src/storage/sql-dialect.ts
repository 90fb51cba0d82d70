/**
 * The stores write SQLite's SQL, kept to a subset PostgreSQL shares; what
 * differs is translated here, once per statement text, and nowhere else:
 * - parameters: `?` and `@name` become `$n` (each name one number);
 * - `INSERT OR IGNORE` becomes `INSERT … ON CONFLICT DO NOTHING`;
 * - `IS NOT ?` (null-safe) becomes `IS DISTINCT FROM $n`;
 * - `LIMIT -1` (no limit) becomes `LIMIT ALL`;
 * - in migrations, SQLite's INTEGER (64 bits) becomes BIGINT and REAL
 *   DOUBLE PRECISION.
 * Booleans stay INTEGER 0/1 and JSON stays TEXT on both, so rows read the
 * same from either backend.
 */

export interface PgStatement {
  text: string;
  /** The `@name`s in `$n` order; null when the parameters are positional. */
  names: string[] | null;
}

/** One statement of the stores' SQL as PostgreSQL's, with how to bind its parameters. */
export function toPostgres(sql: string): PgStatement {
  let text = sql;
  const ignore = /^\s*INSERT\s+OR\s+IGNORE\s+INTO\b/i;
  if (ignore.test(text))
    text = `${text.replace(ignore, 'INSERT INTO').replace(/;\s*$/, '')} ON CONFLICT DO NOTHING`;
  text = text
    .replace(/\bIS\s+NOT\s+(?=[?@])/gi, 'IS DISTINCT FROM ')
    .replace(/\bLIMIT\s+-1\b/gi, 'LIMIT ALL');
  let out = '';
  let positional = 0;
  const names: string[] = [];
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (c === "'" || c === '"') {
      const end = closing(text, i, c);
      out += text.slice(i, end + 1);
      i = end;
    } else if (c === '-' && text[i + 1] === '-') {
      const end = text.indexOf('\n', i);
      i = end < 0 ? text.length : end - 1;
    } else if (c === '?') {
      out += `$${++positional}`;
    } else if (c === '@' && /[A-Za-z_]/.test(text[i + 1] ?? '')) {
      const name = /^[A-Za-z_]\w*/.exec(text.slice(i + 1))?.[0] as string;
      let n = names.indexOf(name);
      if (n < 0) n = names.push(name) - 1;
      out += `$${n + 1}`;
      i += name.length;
    } else {
      out += c;
    }
  }
  if (positional && names.length) throw new Error(`a statement mixes ? and @name parameters: ${sql}`);
  return { text: out, names: names.length ? names : null };
}

function closing(text: string, start: number, quote: string): number {
  let i = start + 1;
  for (;;) {
    const end = text.indexOf(quote, i);
    if (end < 0) return text.length - 1;
    if (text[end + 1] !== quote) return end;
    i = end + 2;
  }
}

/** A migration's DDL in PostgreSQL's types. */
export function ddlToPostgres(sql: string): string {
  return sql.replace(/\bINTEGER\b/g, 'BIGINT').replace(/\bREAL\b/g, 'DOUBLE PRECISION');
}

/** The values of a statement's `$n`, from the arguments its caller gave `get`/`all`/`run`. */
export function bindValues(stmt: PgStatement, args: unknown[], sql: string): unknown[] {
  if (stmt.names) {
    const bag = (args[0] ?? {}) as Record<string, unknown>;
    return stmt.names.map((name) => {
      if (!(name in bag)) throw new RangeError(`Missing named parameter "${name}" in: ${sql}`);
      return value(bag[name]);
    });
  }
  // A bag of named values where the statement names none binds nothing, as in better-sqlite3.
  return args.flatMap((a) => (Array.isArray(a) ? a : isBag(a) ? [] : [a])).map(value);
}

function isBag(v: unknown): boolean {
  return typeof v === 'object' && v !== null && !Buffer.isBuffer(v) && !(v instanceof Uint8Array);
}

function value(v: unknown): unknown {
  if (v === undefined) return null;
  // better-sqlite3 refuses booleans; the stores bind 0/1, and so must anyone new.
  if (typeof v === 'boolean')
    throw new TypeError('SQLite3 can only bind numbers, strings, bigints, buffers, and null');
  return v;
}
