/** The client side of a transfer session: create, state, and the shapes the server answers with. */

import { RangeSet } from '../transfer/range-set.js';
import { type Client, callJson } from './http.js';

export type Range = [start: number, end: number];

export interface TransferJson {
  id: string;
  vdi: string;
  direction: 'upload' | 'download';
  format: string;
  size: number | null;
  state: string;
  task_id: string;
  ttl_seconds: number;
  received: Range[];
  data_path: string;
  url?: string;
  token?: string;
}

export interface TaskJson {
  id: string;
  status: 'pending' | 'running' | 'success' | 'failure' | 'cancelled';
  progress: number;
  error: { code: string; message: string } | null;
  result: unknown;
}

export interface Session {
  id: string;
  taskId: string;
  token: string;
  /** Absolute URL of the session's data, with its token. */
  dataUrl: string;
  /** Path of the session's JSON state, with its token. */
  statePath: string;
  /** Path of the session's data, with its token (for zero operations). */
  dataPath: string;
}

export async function openSession(
  client: Client,
  body: Record<string, unknown>,
): Promise<{ session: Session; transfer: TransferJson }> {
  const t = await callJson<TransferJson>(client, {
    method: 'POST',
    path: '/v1/transfers',
    body,
    management: true,
  });
  return {
    transfer: t,
    session: sessionOf(client, { id: t.id, task_id: t.task_id, token: t.token!, data_path: t.data_path }),
  };
}

/** The URLs of a session known by its id and token (just opened, or saved by an earlier run). */
export function sessionOf(
  client: Client,
  t: { id: string; task_id: string; token: string; data_path: string },
): Session {
  const token = encodeURIComponent(t.token);
  return {
    id: t.id,
    taskId: t.task_id,
    token: t.token,
    // Built from --server rather than the returned url: the server may not know how it is reached.
    dataUrl: `${client.server}${t.data_path}?token=${token}`,
    statePath: `/v1/transfers/${encodeURIComponent(t.id)}?token=${token}`,
    dataPath: `${t.data_path}?token=${token}`,
  };
}

export function transferState(client: Client, s: Session): Promise<TransferJson> {
  return callJson<TransferJson>(client, { method: 'GET', path: s.statePath });
}

/** The parts of [start, end) not covered by `ranges` (in any order, overlapping or not). */
export function missingIn(ranges: readonly Range[], start: number, end: number): Range[] {
  return new RangeSet(ranges).missing(start, end);
}

/** Tells the server that [start, end) reads as zeros, without sending them (ovirt-imageio's zero op). */
export function sendZeros(client: Client, s: Session, start: number, end: number): Promise<TransferJson> {
  return callJson<TransferJson>(client, {
    method: 'PATCH',
    path: s.dataPath,
    body: { op: 'zero', offset: start, size: end - start },
  });
}
