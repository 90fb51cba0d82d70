#!/usr/bin/env node
/**
 * diskport: the command-line client of a diskport server.
 *
 *   diskport upload FILE --vdi ID [--format raw|vhd|qcow2] [--server URL] [--token T]
 *   diskport upload FILE --vdi ID --cancel
 *   diskport download --vdi ID [--format F] -o FILE
 *   diskport backup VDI-URL DIR        (a chain of qcow2 files: a full, then deltas)
 *   diskport restore DIR VDI-URL       (the chain uploaded, checked by checksum)
 *   diskport migrate --set ID|--vdi ID --dest-server URL [--map VDI=SR:FORMAT:MODE]...
 *
 * Both resume by themselves after network errors, with backoff, and a run
 * that stopped (gave up, Ctrl-C, or was killed) is continued by running the
 * same command again; `--cancel` ends the upload session a run left. Exit status:
 * 0 done, 1 failed (the reason, the server's message when it gave one, on stderr),
 * 130 interrupted.
 */
import { Command, InvalidArgumentError, Option } from 'commander';
import { Agent } from 'undici';
import { HttpError, type RetryPolicy } from '../transfer/retry-policy.js';
import type { Endpoint } from '../transfer/transfer-client.js';
import { VERSION } from '../version.js';
import { backup, describeBackup } from './backup.js';
import { describeDownload, download } from './download.js';
import { describeMigrate, migrate } from './migrate.js';
import { describeRestore, restore } from './restore.js';
import { Interrupted } from './run.js';
import { defaultStateDir } from './saved-sessions.js';
import { describeUpload, upload } from './upload.js';
import { cancelSavedUpload } from './upload-session.js';
import { parseVdiUrl } from './vdi-api.js';

const MiB = 1024 * 1024;
const DEFAULT_SERVER = 'http://127.0.0.1:8080';
const DEFAULT_CHUNK_BYTES = 8 * MiB;
const FORMATS = ['raw', 'vhd', 'qcow2'];
/** A finalize may wait up to 300 s for its task before answering. */
const HEADERS_TIMEOUT_MS = 330_000;
const BODY_TIMEOUT_MS = 60_000;
const CONNECT_TIMEOUT_MS = 15_000;

/** A person at a terminal, or a script: patient, since a run given up on must be started again by hand. */
export const DEFAULT_RETRY: RetryPolicy = {
  retries: 10,
  baseDelayMs: 500,
  maxDelayMs: 30_000,
  maxElapsedMs: 10 * 60_000,
};

/** The server, reached through one keep-alive agent. */
function endpointOf(server: string, token: string | undefined): Endpoint & { dispatcher: Agent } {
  let base: URL;
  try {
    base = new URL(server);
  } catch {
    throw new InvalidArgumentError(`--server: '${server}' is not a URL (e.g. http://host:8080)`);
  }
  const dispatcher = new Agent({
    keepAliveTimeout: 10_000,
    headersTimeout: HEADERS_TIMEOUT_MS,
    bodyTimeout: BODY_TIMEOUT_MS,
    connect: { timeout: CONNECT_TIMEOUT_MS },
  });
  return { base, dispatcher, token };
}

/** `8M`, `512k`, `1G`, or plain bytes. */
export function parseSize(value: string): number {
  const m = /^(\d+)\s*([kmgt]?)(i?b)?$/i.exec(value.trim());
  if (!m) throw new InvalidArgumentError('expected a size such as 8M, 512K or 1048576');
  const n = Number(m[1]) * 1024 ** ' kmgt'.indexOf((m[2] || ' ').toLowerCase());
  if (!Number.isSafeInteger(n) || n < 4096) throw new InvalidArgumentError('at least 4K');
  return n;
}

function positiveInt(min: number) {
  return (value: string): number => {
    const n = Number(value);
    if (!Number.isInteger(n) || n < min) throw new InvalidArgumentError(`expected an integer >= ${min}`);
    return n;
  };
}

interface CommonOptions {
  server: string;
  token?: string;
  vdi: string;
  format: string;
  ttl?: number;
  retries: number;
  retryTime: number;
  retryDelay: number;
  progress: boolean;
  json?: boolean;
  verbose?: boolean;
  resume: boolean;
  stateDir: string;
}

function commonOptions(cmd: Command): Command {
  return cmd
    .requiredOption('--vdi <id>', 'the VDI to write or read')
    .addOption(
      new Option('-f, --format <format>', 'wire format of the image').choices(FORMATS).default('raw'),
    )
    .addOption(
      new Option('-s, --server <url>', 'diskport server').env('DISKPORT_SERVER').default(DEFAULT_SERVER),
    )
    .addOption(
      new Option('-t, --token <token>', 'management token (sent as Authorization: Bearer)').env(
        'DISKPORT_TOKEN',
      ),
    )
    .option('--ttl <seconds>', 'idle time before the server expires the session', positiveInt(1))
    .option(
      '--retries <n>',
      'consecutive failed attempts before giving up (resets on progress)',
      positiveInt(0),
      DEFAULT_RETRY.retries,
    )
    .option(
      '--retry-time <seconds>',
      'give up after this long without progress',
      positiveInt(1),
      DEFAULT_RETRY.maxElapsedMs / 1000,
    )
    .option(
      '--retry-delay <ms>',
      'first backoff delay; doubles each attempt (with jitter), capped at 30 s',
      positiveInt(1),
      DEFAULT_RETRY.baseDelayMs,
    )
    .option('--no-resume', 'start over instead of continuing what an earlier run of the same command left')
    .addOption(
      new Option('--state-dir <dir>', 'where runs keep what a later run needs to resume')
        .env('DISKPORT_STATE_DIR')
        .default(defaultStateDir(), '$XDG_STATE_HOME/diskport or ~/.local/state/diskport'),
    )
    .option('--no-progress', 'no progress bar (also off when stderr is not a terminal)')
    .option('--json', 'print a JSON summary on stdout when done')
    .option('-v, --verbose', 'log each request and retry on stderr');
}

function retryPolicy(o: CommonOptions): RetryPolicy {
  return {
    ...DEFAULT_RETRY,
    retries: o.retries,
    baseDelayMs: o.retryDelay,
    maxElapsedMs: o.retryTime * 1000,
  };
}

function showProgress(o: CommonOptions): boolean {
  return o.progress && Boolean(process.stderr.isTTY);
}

export function buildProgram(): Command {
  const program = new Command('diskport')
    .description('Upload and download virtual disk images (raw, vhd, qcow2) to and from a diskport server')
    .version(VERSION)
    .showHelpAfterError()
    .addHelpText(
      'after',
      `
Examples:
  diskport upload disk.img --vdi 5f0c... --server http://host:8080 --token $TOKEN
  diskport upload disk.qcow2 --vdi 5f0c... --format qcow2 --checksum
  diskport download --vdi 5f0c... --format vhd -o disk.vhd
  diskport backup http://host:8080/v1/vdis/5f0c... /backups/db-disk
  diskport restore /backups/db-disk http://host:8080/v1/vdis/77aa...

A run that stopped (the link stayed down, Ctrl-C, a kill) is continued by
running the same command again; --no-resume starts over. An upload's session
stays open on the server (holding the VDI) until it expires, or until
the same upload command with --cancel ends it.

Environment: DISKPORT_SERVER, DISKPORT_TOKEN, DISKPORT_STATE_DIR. Exit status: 0 done,
1 failed, 130 interrupted.`,
    );

  commonOptions(
    program
      .command('upload')
      .description(
        'upload FILE into a VDI: resumable, holes and zero blocks not sent, parallel chunks for raw',
      )
      .argument('<file>', 'the image file to send'),
  )
    .option('--chunk-size <size>', 'bytes per request (K, M, G suffixes)', parseSize, DEFAULT_CHUNK_BYTES)
    .option(
      '-p, --parallel <n>',
      'chunks in flight at once (default: 4 for raw, 1 otherwise)',
      positiveInt(1),
    )
    .option('--checksum', 'compute the sha256 of FILE first; the server verifies it before committing')
    .option(
      '--cancel',
      'cancel the upload session an earlier run into this VDI left open (the VDI stays as it was); send nothing',
    )
    .action(
      async (
        file: string,
        o: CommonOptions & { chunkSize: number; parallel?: number; checksum?: boolean; cancel?: boolean },
      ) => {
        const client = endpointOf(o.server, o.token);
        try {
          if (o.cancel) {
            const said = await cancelSavedUpload(client, { vdi: o.vdi, stateDir: o.stateDir });
            process.stderr.write(`diskport: ${said}\n`);
            return;
          }
          const summary = await upload(client, {
            file,
            vdi: o.vdi,
            format: o.format,
            chunkBytes: o.chunkSize,
            parallel: o.parallel ?? (o.format === 'raw' ? 4 : 1),
            checksum: Boolean(o.checksum),
            ttlSeconds: o.ttl,
            progress: showProgress(o),
            retry: retryPolicy(o),
            verbose: o.verbose,
            stateDir: o.stateDir,
            resume: o.resume,
          });
          if (o.json) process.stdout.write(`${JSON.stringify(summary)}\n`);
          else process.stderr.write(`${describeUpload(summary)}\n`);
        } finally {
          await client.dispatcher.close();
        }
      },
    );

  commonOptions(
    program
      .command('download')
      .description('download a VDI in a wire format to a file: resumable, written sparse')
      .requiredOption('-o, --output <file>', 'the file to write (replaced)'),
  ).action(async (o: CommonOptions & { output: string }) => {
    const client = endpointOf(o.server, o.token);
    try {
      const summary = await download(client, {
        vdi: o.vdi,
        format: o.format,
        output: o.output,
        ttlSeconds: o.ttl,
        progress: showProgress(o),
        retry: retryPolicy(o),
        stateDir: o.stateDir,
        resume: o.resume,
      });
      if (o.json) process.stdout.write(`${JSON.stringify(summary)}\n`);
      else process.stderr.write(`${describeDownload(summary)}\n`);
    } finally {
      await client.dispatcher.close();
    }
  });
  program
    .command('backup')
    .description(
      'incremental backup: snapshot the VDI and add one qcow2 file to the chain in DIR (the first run a full export, each later one the changes since the previous run), resumable',
    )
    .argument('<vdi-url>', "the VDI's URL, e.g. http://host:8080/v1/vdis/ID", parseVdiUrl)
    .argument('<dir>', 'the backup directory (created if missing)')
    .addOption(
      new Option('-t, --token <token>', 'management token (sent as Authorization: Bearer)').env(
        'DISKPORT_TOKEN',
      ),
    )
    .option(
      '--keep-snapshots <n>',
      "backup snapshots kept on the server, newest first (the newest is the next run's base)",
      positiveInt(1),
      1,
    )
    .option(
      '--retries <n>',
      'consecutive failed attempts before giving up',
      positiveInt(0),
      DEFAULT_RETRY.retries,
    )
    .option(
      '--retry-delay <ms>',
      'first backoff delay; doubles each attempt',
      positiveInt(1),
      DEFAULT_RETRY.baseDelayMs,
    )
    .option('--no-progress', 'no progress bar (also off when stderr is not a terminal)')
    .option('--json', 'print a JSON summary on stdout when done')
    .action(
      async (
        target: { base: URL; vdi: string },
        dir: string,
        o: ChainOptions & { keepSnapshots: number },
      ) => {
        const client = endpointOf(target.base.href, o.token);
        try {
          const summary = await backup(client, {
            vdi: target.vdi,
            dir,
            progress: o.progress && Boolean(process.stderr.isTTY),
            retry: { ...DEFAULT_RETRY, retries: o.retries, baseDelayMs: o.retryDelay },
            keepSnapshots: o.keepSnapshots,
          });
          if (o.json) process.stdout.write(`${JSON.stringify(summary)}\n`);
          else process.stderr.write(`${describeBackup(summary)}\n`);
        } finally {
          await client.dispatcher.close();
        }
      },
    );
  program
    .command('migrate')
    .description(
      'migrate a disk set (or one VDI) to another diskport, each disk to its own SR and format: one progress bar per disk and a total',
    )
    .option('--set <id>', 'the disk set to migrate')
    .option('--vdi <id>', 'a single VDI to migrate (through a disk set made for the run)')
    .option('--dest <token>', "the destination's receive token (POST /v1/migrations/receive there)")
    .option('--dest-server <url>', 'or: the destination, asked for a receive token')
    .addOption(
      new Option(
        '--dest-token <token>',
        "the destination's management token, to ask it for a receive token",
      ).env('DISKPORT_DEST_TOKEN'),
    )
    .option('--dest-sr <sr>', 'the destination SR for disks the map sends nowhere in particular')
    .option(
      '--map <VDI=SR[:FORMAT][:MODE]>',
      'where a disk goes (repeatable); MODE is copy (default), blank or skip, e.g. --map 5f0c...=fast:qcow2',
      (v: string, all: string[]) => [...all, v],
      [] as string[],
    )
    .option('--delete-source', 'delete the moved VDIs once the destination committed them all')
    .addOption(
      new Option('-s, --server <url>', 'the source diskport').env('DISKPORT_SERVER').default(DEFAULT_SERVER),
    )
    .addOption(
      new Option('-t, --token <token>', 'management token (sent as Authorization: Bearer)').env(
        'DISKPORT_TOKEN',
      ),
    )
    .option('--no-progress', 'no progress bars (also off when stderr is not a terminal)')
    .option('--json', 'print a JSON summary on stdout when done')
    .action(
      async (o: {
        set?: string;
        vdi?: string;
        dest?: string;
        destServer?: string;
        destToken?: string;
        destSr?: string;
        map: string[];
        deleteSource?: boolean;
        server: string;
        token?: string;
        progress: boolean;
        json?: boolean;
      }) => {
        const summary = await migrate({
          ...o,
          deleteSource: Boolean(o.deleteSource),
          progress: o.progress && Boolean(process.stderr.isTTY),
        });
        if (o.json) process.stdout.write(`${JSON.stringify(summary)}\n`);
        else process.stderr.write(`${describeMigrate(summary)}\n`);
      },
    );
  program
    .command('restore')
    .description(
      'upload the disk a backup directory holds into a VDI (the full export, then each delta onto it), resumable, and check its sha256 against the backup',
    )
    .argument('<dir>', 'a directory diskport backup wrote')
    .argument(
      '<vdi-url>',
      "the VDI to write, of the backed-up disk's size, e.g. http://host:8080/v1/vdis/ID",
      parseVdiUrl,
    )
    .addOption(
      new Option('-t, --token <token>', 'management token (sent as Authorization: Bearer)').env(
        'DISKPORT_TOKEN',
      ),
    )
    .option('--at <snapshot>', 'the backup run to restore, by its snapshot id (default: the newest)')
    .option(
      '--retries <n>',
      'consecutive failed attempts before giving up',
      positiveInt(0),
      DEFAULT_RETRY.retries,
    )
    .option(
      '--retry-delay <ms>',
      'first backoff delay; doubles each attempt',
      positiveInt(1),
      DEFAULT_RETRY.baseDelayMs,
    )
    .addOption(
      new Option('--state-dir <dir>', 'where runs keep what a later run needs to resume')
        .env('DISKPORT_STATE_DIR')
        .default(defaultStateDir(), '$XDG_STATE_HOME/diskport or ~/.local/state/diskport'),
    )
    .option('--no-progress', 'no progress bar (also off when stderr is not a terminal)')
    .option('--json', 'print a JSON summary on stdout when done')
    .option('-v, --verbose', 'log each request and retry on stderr')
    .action(
      async (
        dir: string,
        target: { base: URL; vdi: string },
        o: ChainOptions & { at?: string; stateDir: string; verbose?: boolean },
      ) => {
        const client = endpointOf(target.base.href, o.token);
        try {
          const summary = await restore(client, {
            dir,
            vdi: target.vdi,
            at: o.at,
            progress: o.progress && Boolean(process.stderr.isTTY),
            retry: { ...DEFAULT_RETRY, retries: o.retries, baseDelayMs: o.retryDelay },
            stateDir: o.stateDir,
            verbose: o.verbose,
          });
          if (o.json) process.stdout.write(`${JSON.stringify(summary)}\n`);
          else process.stderr.write(`${describeRestore(summary)}\n`);
        } finally {
          await client.dispatcher.close();
        }
      },
    );
  return program;
}

interface ChainOptions {
  token?: string;
  retries: number;
  retryDelay: number;
  progress: boolean;
  json?: boolean;
}

function describeError(err: unknown): string {
  if (err instanceof HttpError) return `${err.message} (${err.code})`;
  if (err instanceof Error) {
    const code = (err as { code?: string }).code;
    return code && !err.message.includes(code) ? `${err.message} (${code})` : err.message;
  }
  return String(err);
}

buildProgram()
  .parseAsync(process.argv)
  .catch((err: unknown) => {
    process.stderr.write(`diskport: ${describeError(err)}\n`);
    process.exitCode = err instanceof Interrupted ? 130 : 1;
  });
