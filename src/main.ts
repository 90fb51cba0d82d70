#!/usr/bin/env node
/** Entry point: parse settings, open the data directory, serve. */
import { CommanderError } from 'commander';
import { pino } from 'pino';
import { createServer } from './app.js';
import { checkListenPolicy, parseConfig } from './config.js';
import { createServices } from './services.js';

async function main(): Promise<void> {
  let config: ReturnType<typeof parseConfig>;
  try {
    config = parseConfig(process.argv.slice(2));
  } catch (err) {
    if (err instanceof CommanderError) process.exit(err.exitCode);
    throw err;
  }
  const logger = pino({ level: config.logLevel });
  const refusal = checkListenPolicy(config);
  if (refusal) {
    logger.fatal(refusal);
    console.error(`diskport: ${refusal}`);
    process.exit(2);
  }
  const services = await createServices(config, logger);
  const server = createServer(services);
  server.listen(config.port, config.host, () => {
    const addr = server.address();
    const port = typeof addr === 'object' && addr ? addr.port : config.port;
    logger.info(
      { host: config.host, port, dataDir: config.dataDir },
      `diskport listening on http://${config.host}:${port}`,
    );
  });
  const stop = (signal: string) => {
    logger.info({ signal }, 'shutting down');
    server.close();
    server.closeAllConnections();
    void services.close().then(() => process.exit(0));
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
}

main().catch((err) => {
  console.error('diskport: failed to start:', err);
  process.exit(1);
});
