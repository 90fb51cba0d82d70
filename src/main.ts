#!/usr/bin/env node
/** Entry point: parse settings, open the data directory, serve. */
import { promises as fsp } from 'node:fs';
import type http from 'node:http';
import net from 'node:net';
import { CommanderError } from 'commander';
import type { pino } from 'pino';
import { createServer } from './app.js';
import { type Config, checkListenPolicy, nodeUrlOf, parseConfig } from './config.js';
import { createLogger } from './http/log-redaction.js';
import { createServices, type Services } from './services.js';
import { DataDirInUseError } from './storage/data-dir-lock.js';
import { DatabaseUnreachableError } from './storage/pg-db.js';

/** A listen error as one line for whoever started the server; null when it is not one we can explain. */
function listenFailure(err: NodeJS.ErrnoException, host: string, port: number): string | null {
  const where = `${host}:${port}`;
  switch (err.code) {
    case 'EADDRINUSE':
      return `cannot listen on ${where}: the port is already in use (another diskport?); stop what holds it, or choose another port with --port or DISKPORT_PORT`;
    case 'EACCES':
      return `cannot listen on ${where}: permission denied (ports below 1024 need privileges); choose another port with --port or DISKPORT_PORT`;
    case 'EADDRNOTAVAIL':
      return `cannot listen on ${where}: ${host} is not an address of this machine; choose another with --host or DISKPORT_HOST`;
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
      return `cannot listen on ${where}: the host name ${host} does not resolve; choose another with --host or DISKPORT_HOST`;
    default:
      return null;
  }
}

/**
 * Fails early when the address cannot be listened on, before the data
 * directory is opened: a second diskport started by mistake on the same port
 * and data directory would otherwise run restart recovery over the first
 * one's running transfers.
 */
function probeListen(config: Config): Promise<NodeJS.ErrnoException | null> {
  if (config.port === 0) return Promise.resolve(null);
  return new Promise((resolve) => {
    const probe = net.createServer();
    probe.once('error', (err) => resolve(err));
    probe.listen({ port: config.port, host: config.host, exclusive: true }, () =>
      probe.close(() => resolve(null)),
    );
  });
}

/** One line, exit status 1: a port that is taken is a setting to change, not a crash to debug. */
function exitListenFailure(logger: pino.Logger, config: Config, err: NodeJS.ErrnoException): never {
  const message = listenFailure(err, config.host, config.port);
  if (message) {
    logger.fatal({ code: err.code }, message);
    console.error(`diskport: ${message}`);
  } else {
    console.error('diskport: failed to start:', err);
  }
  process.exit(1);
}

/** ovirt-imageio's local transport: /images/ on a Unix socket (a stale socket file of a previous run is replaced). */
async function listenImageioSocket(services: Services, socketPath: string): Promise<http.Server> {
  await fsp.rm(socketPath, { force: true });
  const local = createServer(services, { imageioOnly: true });
  await new Promise<void>((resolve, reject) => {
    local.once('error', reject);
    local.listen(socketPath, () => resolve());
  });
  await fsp.chmod(socketPath, 0o600);
  services.logger.info({ socket: socketPath }, `serving /images/ on unix:${socketPath}`);
  return local;
}

async function main(): Promise<void> {
  let config: ReturnType<typeof parseConfig>;
  try {
    config = parseConfig(process.argv.slice(2));
  } catch (err) {
    if (err instanceof CommanderError) process.exit(err.exitCode);
    throw err;
  }
  const logger = createLogger(config.logLevel);
  const refusal = checkListenPolicy(config);
  if (refusal) {
    logger.fatal(refusal);
    console.error(`diskport: ${refusal}`);
    process.exit(2);
  }
  const busy = await probeListen(config);
  if (busy) exitListenFailure(logger, config, busy);
  let services: Services;
  try {
    services = await createServices(config, logger);
  } catch (err) {
    if (!(err instanceof DatabaseUnreachableError || err instanceof DataDirInUseError)) throw err;
    logger.fatal(err.message);
    console.error(`diskport: ${err.message}`);
    process.exit(1);
  }
  const server = createServer(services);
  // Taken between the probe and now: the same answer, after letting go of the data directory.
  server.once('error', (err: NodeJS.ErrnoException) => {
    void services.close().finally(() => exitListenFailure(logger, config, err));
  });
  server.listen(config.port, config.host, () => {
    const addr = server.address();
    const port = typeof addr === 'object' && addr ? addr.port : config.port;
    // What the other nodes (and GET /v1/nodes) call this one: where they forward its sessions' requests.
    try {
      services.nodes.setAddress(config.nodeUrl ?? nodeUrlOf(config.host, port));
    } catch (err) {
      logger.error({ err }, "could not record this node's address");
    }
    logger.info(
      { host: config.host, port, dataDir: config.dataDir },
      `diskport listening on http://${config.host}:${port}`,
    );
  });
  const local = config.imageioSocket ? await listenImageioSocket(services, config.imageioSocket) : null;
  const stop = (signal: string) => {
    logger.info({ signal }, 'shutting down');
    server.close();
    server.closeAllConnections();
    local?.close();
    local?.closeAllConnections();
    void services.close().then(() => process.exit(0));
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
}

main().catch((err) => {
  console.error('diskport: failed to start:', err);
  process.exit(1);
});
