/** Small HTTP helpers shared by the tests; every JSON response is checked against openapi.yaml. */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { promisify } from 'node:util';
import type { TransferJson as Served } from '../../src/transfer/session-record.js';
import { assertMatchesOpenApi } from './openapi.js';

export const execFileP = promisify(execFile);

export interface JsonResponse<T = unknown> {
  status: number;
  headers: Headers;
  body: T;
}

export async function api<T = Record<string, unknown>>(
  base: string,
  method: string,
  path: string,
  body?: unknown,
  headers: Record<string, string> = {},
): Promise<JsonResponse<T>> {
  const res = await fetch(base + path, {
    method,
    headers: body === undefined ? headers : { 'content-type': 'application/json', ...headers },
    body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body),
  });
  const text = await res.text();
  const json = text && (res.headers.get('content-type') ?? '').includes('json') ? JSON.parse(text) : text;
  assertMatchesOpenApi(method, path, res.status, json);
  return { status: res.status, headers: res.headers, body: json as T };
}

export async function createVdi(base: string, virtualSize: number, extra: Record<string, unknown> = {}) {
  const res = await api<{ id: string; virtual_size: number }>(base, 'POST', '/v1/vdis', {
    name_label: 'test disk',
    virtual_size: virtualSize,
    ...extra,
  });
  assert.equal(res.status, 201, JSON.stringify(res.body));
  return res.body;
}

/** A transfer session as the API answers it at its creation, with the data URL and its token. */
export type TransferJson = Served & { url: string; token: string };

/** Opens an upload session (POST /v1/transfers); 201 or the test fails. `T`: the fields the test reads. */
export async function openUpload<T = TransferJson>(
  base: string,
  vdi: string,
  size: number,
  format = 'raw',
): Promise<T> {
  const res = await api<T>(base, 'POST', '/v1/transfers', { vdi, direction: 'upload', format, size });
  assert.equal(res.status, 201, JSON.stringify(res.body));
  return res.body;
}

/** Runs curl; resolves with stdout as a Buffer. */
export async function curl(args: string[]): Promise<Buffer> {
  const { stdout } = await execFileP('curl', ['-sS', '--fail-with-body', ...args], {
    encoding: 'buffer',
    maxBuffer: 256 * 1024 * 1024,
  });
  return stdout;
}

export async function sha256File(file: string, start = 0, end?: number): Promise<string> {
  const h = createHash('sha256');
  for await (const c of createReadStream(file, { start, end, highWaterMark: 1 << 20 })) h.update(c as Buffer);
  return h.digest('hex');
}

export async function sha256Url(url: string, headers: Record<string, string> = {}): Promise<string> {
  const res = await fetch(url, { headers });
  assert.ok(res.ok, `GET ${url}: ${res.status}`);
  const h = createHash('sha256');
  for await (const c of res.body as unknown as AsyncIterable<Uint8Array>) h.update(c);
  return h.digest('hex');
}
