/** The HTTP application: middleware, routes, errors. Routes stay thin; services do the work. */
import { randomUUID } from 'node:crypto';
import http from 'node:http';
import express, { type Express } from 'express';
import { pinoHttp } from 'pino-http';
import { requireToken } from './http/auth.js';
import { ConnectionGuard } from './http/connections.js';
import { continueUnlessUpload } from './http/continue.js';
import { errorHandler, notFoundHandler } from './http/errors.js';
import { redactError, redactRequest, redactResponse } from './http/log-redaction.js';
import { rejectRepeatedQuery } from './http/query.js';
import { endBodyAtEof, onClientError } from './http/read-to-eof.js';
import { type HttpLogger, leanRequestLog, type RequestLogger } from './http/request-log.js';
import { sessionForwarding } from './http/session-forwarding.js';
import { transferTokenAuth } from './http/transfer-auth.js';
import { checksumRoutes } from './routes/checksum.js';
import { contentRoutes } from './routes/contents.js';
import { diskSetRoutes } from './routes/disk-sets.js';
import { extentRoutes } from './routes/extents.js';
import { healthRoutes } from './routes/health.js';
import { imageioImageRoutes } from './routes/imageio-images.js';
import { imageioTicketRoutes } from './routes/imageio-tickets.js';
import { leanRoutes } from './routes/lean.js';
import { metricsRoutes } from './routes/metrics.js';
import { migrationAuth, migrationRoutes } from './routes/migrations.js';
import { nodeRoutes } from './routes/nodes.js';
import { srRoutes } from './routes/srs.js';
import { taskRoutes } from './routes/tasks.js';
import { transferRoutes } from './routes/transfers.js';
import { tusRoutes } from './routes/tus.js';
import { vdiRoutes } from './routes/vdis.js';
import { readsToEndOfConnection, xapiRoutes } from './routes/xapi.js';
import type { Services } from './services.js';

const REQUEST_ID_PATTERN = /^[A-Za-z0-9._-]{1,128}$/;

/** The request's id: the client's X-Request-Id when it is a sane one, else a new one; echoed. */
function genReqId(req: http.IncomingMessage, res: http.ServerResponse): string {
  const incoming = req.headers['x-request-id'];
  const id = typeof incoming === 'string' && REQUEST_ID_PATTERN.test(incoming) ? incoming : randomUUID();
  res.setHeader('X-Request-Id', id);
  return id;
}

/** pino-http: the request id (X-Request-Id), `req.log`, and a line at each request's end. */
function requestLogger(s: Services): HttpLogger {
  return pinoHttp({
    logger: s.logger,
    genReqId,
    customLogLevel: (_req, res, err) => (err || res.statusCode >= 500 ? 'error' : 'info'),
    serializers: { req: redactRequest, res: redactResponse, err: redactError },
  });
}

/** `imageioOnly`: the app of the --imageio-socket, which serves /images/ and nothing else. */
export function createApp(
  s: Services,
  opts: { imageioOnly?: boolean } = {},
  logRequest: RequestLogger = requestLogger(s),
): Express {
  const app = express();
  app.disable('x-powered-by');
  app.set('etag', false); // exports carry their own strong ETags; JSON needs none
  app.set('query parser', 'simple');

  app.use((req, res, next) => {
    logRequest(req, res);
    next();
  });

  app.use(rejectRepeatedQuery);
  app.use(continueUnlessUpload);
  // The ticket id is the only credential of /images/, as in ovirt-imageio.
  app.use(imageioImageRoutes(s));
  if (opts.imageioOnly) {
    app.use(notFoundHandler);
    app.use(errorHandler);
    return app;
  }
  app.use(healthRoutes());
  app.use(metricsRoutes(s));
  app.use('/v1/transfers/:id', transferTokenAuth(s.transfers, s.config.token));
  app.use('/v1/migrations/:id', migrationAuth(s));
  app.use('/v1', requireToken(s.config.token));
  app.use(
    '/v1',
    express.json({ limit: '1mb', strict: true, type: ['application/json', 'application/*+json'] }),
  );
  app.use(srRoutes(s));
  app.use(nodeRoutes(s));
  app.use(vdiRoutes(s));
  app.use(diskSetRoutes(s));
  app.use(migrationRoutes(s));
  app.use(contentRoutes(s));
  app.use(extentRoutes(s));
  app.use(checksumRoutes(s));
  app.use(taskRoutes(s));
  app.use(transferRoutes(s));
  app.use(imageioTicketRoutes(s));
  app.use(tusRoutes(s));
  app.use(xapiRoutes(s));
  app.use(notFoundHandler);
  app.use(errorHandler);
  return app;
}

/**
 * The HTTP server for the app: no request timeout (an upload takes hours;
 * a stalled one is ended by the upload idle timeout, src/http/continue.ts),
 * a headers timeout, connections that never send a request closed, a limit
 * on connections (src/http/connections.ts), and `Expect: 100-continue` left
 * to the app.
 */
export function createServer(s: Services, opts: { imageioOnly?: boolean } = {}): http.Server {
  const logRequest = requestLogger(s);
  const app = createApp(s, opts, logRequest);
  // The hot reads skip express (src/routes/lean.ts); not on the imageio socket, which has no /v1.
  const logLean = leanRequestLog(logRequest, genReqId);
  const lean = opts.imageioOnly ? () => false : leanRoutes(s, logLean);
  // Another node's session is passed to it (several nodes over one database).
  const forwarded = opts.imageioOnly ? () => false : sessionForwarding(s, logLean);
  const { headersTimeoutMs } = s.config;
  const server = http.createServer({
    // TCP keepalive finds peers that vanished without a word (then the idle timeout acts).
    keepAlive: true,
    keepAliveInitialDelay: 30_000,
    // How often Node looks for requests past headersTimeout (30 s by default).
    connectionsCheckingInterval: Math.min(30_000, Math.max(100, Math.floor(headersTimeoutMs / 2))),
  });
  const connections = new ConnectionGuard(server, s.config);
  const handle = (req: http.IncomingMessage, res: http.ServerResponse) => {
    if (connections.refuse(req, res)) return;
    // Before the app: the connection may end in the same read as the headers.
    if (readsToEndOfConnection(req)) endBodyAtEof(req, res);
    if (!forwarded(req, res) && !lean(req, res)) app(req, res);
  };
  server.on('request', handle);
  server.on('checkContinue', handle);
  server.on('clientError', onClientError);
  server.requestTimeout = 0;
  server.headersTimeout = headersTimeoutMs;
  server.keepAliveTimeout = 65_000;
  return server;
}
