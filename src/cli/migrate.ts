/**
 * `diskport migrate`: moves a disk set, or a single VDI, to another diskport
 * (POST /v1/disk-sets/{id}/migrate), showing one progress bar per disk and
 * one for the whole. The receive token comes from --dest, or is asked of
 * the destination (--dest-server, with its own --dest-token). A single VDI
 * goes through a disk set of its own, made for the run and removed after.
 */
import { MultiBar, Presets, type SingleBar } from 'cli-progress';
import { formatBytes } from './progress.js';

export interface MigrateOptions {
  server: string;
  token?: string;
  set?: string;
  vdi?: string;
  dest?: string;
  destServer?: string;
  destToken?: string;
  destSr?: string;
  /** VDI=SR[:FORMAT][:MODE] */
  map: string[];
  deleteSource: boolean;
  progress: boolean;
  pollMs?: number;
}

interface Task {
  id: string;
  status: string;
  progress: number;
  bytes_done: number;
  bytes_total: number | null;
  error: { code: string; message: string } | null;
  result: {
    disks?: { vdi: string; mode: string; task: string | null; dest_vdi: string | null }[];
    [k: string]: unknown;
  } | null;
}

export interface MigrateSummary {
  task: string;
  status: string;
  disks: { vdi: string; mode: string; dest_vdi: string | null }[];
  result: Task['result'];
}

const MODES = ['copy', 'blank', 'skip'];
const FORMATS = ['raw', 'vhd', 'qcow2'];

/** `VDI=SR[:FORMAT][:MODE]`, each part after the SR optional and recognised by its value. */
export function parseMapEntry(
  value: string,
): [string, { sr?: string; image_format?: string; mode?: string }] {
  const eq = value.indexOf('=');
  if (eq <= 0) throw new Error(`--map '${value}': expected VDI=SR[:FORMAT][:MODE], e.g. 5f0c...=fast:qcow2`);
  const entry: { sr?: string; image_format?: string; mode?: string } = {};
  const [sr, ...rest] = value.slice(eq + 1).split(':');
  if (sr && !MODES.includes(sr)) entry.sr = sr;
  else if (sr) entry.mode = sr;
  for (const part of rest) {
    if (FORMATS.includes(part)) entry.image_format = part;
    else if (MODES.includes(part)) entry.mode = part;
    else
      throw new Error(`--map '${value}': '${part}' is neither a format (${FORMATS}) nor a mode (${MODES})`);
  }
  return [value.slice(0, eq), entry];
}

async function call<T>(
  base: string,
  token: string | undefined,
  method: string,
  path: string,
  body?: unknown,
) {
  const res = await fetch(new URL(path, base), {
    method,
    headers: {
      ...(token ? { authorization: `Bearer ${token}` } : {}),
      ...(body === undefined ? {} : { 'content-type': 'application/json' }),
    },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  const json = text ? JSON.parse(text) : null;
  if (!res.ok) {
    const e = json?.error;
    const problems: { vdi: string | null; message: string }[] = e?.details?.problems ?? [];
    const listed = problems.map((p) => `\n  ${p.vdi ?? 'set'}: ${p.message}`).join('');
    const err = new Error(`${method} ${path}: ${e?.message ?? `HTTP ${res.status}`}${listed}`);
    throw Object.assign(err, { code: e?.code });
  }
  return json as T;
}

export async function migrate(o: MigrateOptions): Promise<MigrateSummary> {
  if (!o.set === !o.vdi) throw new Error('name either --set or --vdi');
  let dest = o.dest;
  if (!dest) {
    if (!o.destServer) throw new Error('name the destination: --dest TOKEN, or --dest-server URL');
    dest = (
      await call<{ token: string }>(o.destServer, o.destToken, 'POST', '/v1/migrations/receive', {
        ...(o.destSr ? { sr: o.destSr } : {}),
      })
    ).token;
  }
  let setId = o.set;
  let ownSet = false;
  if (o.vdi) {
    const made = await call<{ id: string }>(o.server, o.token, 'POST', '/v1/disk-sets', {
      name_label: `diskport migrate ${o.vdi}`,
      vdis: [o.vdi],
    });
    setId = made.id;
    ownSet = true;
  }
  try {
    const map = Object.fromEntries(o.map.map(parseMapEntry));
    const started = await call<Task>(o.server, o.token, 'POST', `/v1/disk-sets/${setId}/migrate`, {
      dest,
      map,
      delete_source: o.deleteSource,
    });
    const end = await follow(o, started);
    const disks = (end.result?.disks ?? started.result?.disks ?? []).map((d) => ({
      vdi: d.vdi,
      mode: d.mode,
      dest_vdi: d.dest_vdi,
    }));
    if (end.status !== 'success') {
      throw Object.assign(new Error(`the migration ${end.status}: ${end.error?.message ?? ''}`), {
        code: end.error?.code,
      });
    }
    return { task: end.id, status: end.status, disks, result: end.result };
  } finally {
    if (ownSet) await call(o.server, o.token, 'DELETE', `/v1/disk-sets/${setId}`).catch(() => {});
  }
}

/** Polls the parent and its children until the parent ends, drawing their bars. */
async function follow(o: MigrateOptions, started: Task): Promise<Task> {
  const children = (started.result?.disks ?? []).filter((d) => d.task);
  const multi = o.progress
    ? new MultiBar(
        {
          format: '{label} [{bar}] {percentage}% | {done} / {size}',
          hideCursor: true,
          stream: process.stderr,
          fps: 5,
        },
        Presets.legacy,
      )
    : null;
  const bars = new Map<string, SingleBar>();
  const draw = (label: string, t: Task) => {
    if (!multi) return;
    const total = Math.max(1, t.bytes_total ?? 0);
    let bar = bars.get(t.id);
    if (!bar) {
      bar = multi.create(total, 0, { label, done: '0 B', size: formatBytes(t.bytes_total ?? 0) });
      bars.set(t.id, bar);
    }
    const done = t.status === 'success' ? total : Math.round(t.progress * total);
    bar.update(done, { label, done: formatBytes(t.bytes_done), size: formatBytes(t.bytes_total ?? 0) });
  };
  try {
    for (;;) {
      const parent = await call<Task>(
        o.server,
        o.token,
        'GET',
        `/v1/tasks/${started.id}?wait=${(o.pollMs ?? 500) / 1000}`,
      );
      for (const d of children) {
        const t = await call<Task>(o.server, o.token, 'GET', `/v1/tasks/${d.task}`);
        draw(`${d.vdi.slice(0, 8)} ${d.mode.padEnd(5)}`, t);
      }
      draw('total         ', parent);
      if (parent.status !== 'running' && parent.status !== 'pending') return parent;
    }
  } finally {
    multi?.stop();
  }
}

export function describeMigrate(s: MigrateSummary): string {
  const lines = s.disks.map((d) => `  ${d.vdi} (${d.mode}) -> ${d.dest_vdi ?? '-'}`);
  return [`diskport: migrated ${s.disks.length} disk(s), task ${s.task}`, ...lines].join('\n');
}
