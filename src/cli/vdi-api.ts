/**
 * The calls `backup` and `restore` make on a VDI, beside the transfer
 * client's: a VDI named by its URL (`http://host:8080/v1/vdis/{id}`), read,
 * snapshotted, listed, deleted and checksummed with the management token.
 * Every call is retried by the caller's policy when the link or the server
 * is down, never when the server refuses.
 */
import { InvalidArgumentError } from 'commander';
import { HttpError } from '../transfer/retry-policy.js';
import { callJson, type Endpoint, getTask, send } from '../transfer/transfer-client.js';

/** A VDI as `GET /v1/vdis/{id}` describes it (the fields the CLI reads). */
export interface VdiJson {
  id: string;
  name_label: string;
  virtual_size: number;
  generation: number;
  is_snapshot: boolean;
  snapshot_of: string | null;
  snapshot_time: string | null;
}

/** `http://host:8080/v1/vdis/{id}` (any path prefix before /v1) → the server's base URL and the VDI's id. */
export function parseVdiUrl(value: string): { base: URL; vdi: string } {
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    throw new InvalidArgumentError(
      `'${value}' is not a URL; give the VDI's, e.g. http://host:8080/v1/vdis/ID`,
    );
  }
  const m = /^(.*)\/v1\/vdis\/([^/]+)\/?$/.exec(url.pathname);
  if (!/^https?:$/.test(url.protocol) || !m) {
    throw new InvalidArgumentError(
      `'${value}' does not name a VDI; give its URL, e.g. http://host:8080/v1/vdis/ID`,
    );
  }
  const base = new URL(url);
  base.pathname = m[1] || '/';
  base.search = '';
  base.hash = '';
  return { base, vdi: decodeURIComponent(m[2]) };
}

const vdiPath = (id: string) => `/v1/vdis/${encodeURIComponent(id)}`;

/** The VDI, or a message saying it does not exist on that server. */
export async function getVdi(ep: Endpoint, id: string): Promise<VdiJson> {
  try {
    return await callJson<VdiJson>(ep, { method: 'GET', path: vdiPath(id), management: true });
  } catch (err) {
    if (err instanceof HttpError && err.status === 404) {
      throw new HttpError(
        404,
        err.code,
        `VDI ${id} does not exist on ${ep.base.href} (${err.message}); check the URL`,
        err.details,
      );
    }
    throw err;
  }
}

/** The VDI, or undefined when the server does not know it. */
export async function findVdi(ep: Endpoint, id: string): Promise<VdiJson | undefined> {
  try {
    return await callJson<VdiJson>(ep, { method: 'GET', path: vdiPath(id), management: true });
  } catch (err) {
    if (err instanceof HttpError && err.status === 404) return undefined;
    throw err;
  }
}

export function snapshot(ep: Endpoint, id: string, nameLabel: string): Promise<VdiJson> {
  return callJson<VdiJson>(ep, {
    method: 'POST',
    path: `${vdiPath(id)}/snapshots`,
    body: { name_label: nameLabel },
    management: true,
  });
}

/** Every snapshot of the VDI, following the list's `Link: rel="next"` pages. */
export async function snapshotsOf(ep: Endpoint, id: string): Promise<VdiJson[]> {
  const all: VdiJson[] = [];
  let cursor: string | undefined;
  do {
    const res = await send(ep, {
      method: 'GET',
      path: `${vdiPath(id)}/snapshots`,
      query: { limit: '1000', ...(cursor && { cursor }) },
      headers: { accept: 'application/json' },
      management: true,
    });
    all.push(...((await res.body.json()) as VdiJson[]));
    const link = String(res.headers.link ?? '');
    cursor = /[?&]cursor=([^&>]+)[^>]*>;\s*rel="next"/.exec(link)?.[1];
    if (cursor) cursor = decodeURIComponent(cursor);
  } while (cursor);
  return all;
}

/** Deletes a VDI; one already gone is fine. */
export async function deleteVdi(ep: Endpoint, id: string): Promise<void> {
  try {
    await send(ep, { method: 'DELETE', path: vdiPath(id), management: true }).then((r) => r.body.dump());
  } catch (err) {
    if (!(err instanceof HttpError && err.status === 404)) throw err;
  }
}

/** The sha256 of the VDI's virtual disk; a large disk's is a task, waited for. */
export async function sha256Of(ep: Endpoint, id: string): Promise<string> {
  const res = await send(ep, {
    method: 'GET',
    path: `${vdiPath(id)}/checksum`,
    query: { algorithm: 'sha256' },
    headers: { accept: 'application/json' },
    management: true,
  });
  const body = (await res.body.json()) as { id?: string; checksum?: string };
  if (res.statusCode !== 202) return String(body.checksum);
  for (;;) {
    const task = await getTask(ep, String(body.id), 60);
    if (task.status === 'success') return String((task.result as { checksum?: string }).checksum);
    if (task.status !== 'pending' && task.status !== 'running') {
      throw new HttpError(
        500,
        task.error?.code ?? 'CHECKSUM_FAILED',
        task.error?.message ?? `the checksum of VDI ${id} ended as ${task.status}`,
      );
    }
  }
}
