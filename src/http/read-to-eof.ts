/**
 * Bodies that end with the connection. Xen Orchestra, which cannot send a
 * chunked body to xapi, declares `Content-Length: 1125899906842624` (1 PiB)
 * when it does not know an upload's length, sends the image and half-closes
 * the connection; xapi reads to the end of the connection. Node's HTTP parser
 * takes that end for a broken request (HPE_INVALID_EOF_STATE) and would abort
 * it. A request marked here ends where the connection does instead: its body
 * ends at the client's FIN, the answer goes out on the half-open connection,
 * and the connection then closes.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Duplex } from 'node:stream';

const endingAtEof = new WeakSet<Duplex>();

/** From now on, the end of `req`'s connection is the end of its body. */
export function endBodyAtEof(req: IncomingMessage, res: ServerResponse): void {
  const socket = req.socket;
  endingAtEof.add(socket);
  // Nothing can follow a body that ends with the connection.
  res.shouldKeepAlive = false;
  const onEnd = () => {
    if (req.complete || req.readableEnded) return;
    // The message is whole: without this, its end would count as an abort and take the socket down.
    req.complete = true;
    req.push(null);
  };
  socket.once('end', onEnd);
  res.once('close', () => {
    socket.off('end', onEnd);
    endingAtEof.delete(socket);
  });
}

/**
 * Node's own answers to a request it cannot parse (what it does when no
 * 'clientError' listener exists), except for a body that ends at the end of
 * its connection, which is no error here.
 */
export function onClientError(err: NodeJS.ErrnoException, socket: Duplex): void {
  if (err.code === 'HPE_INVALID_EOF_STATE' && endingAtEof.has(socket)) return;
  const inFlight = (socket as Duplex & { _httpMessage?: ServerResponse | null })._httpMessage;
  if (socket.writable && !inFlight?.headersSent) {
    socket.write(
      `HTTP/1.1 ${STATUS_OF_PARSE_ERROR[err.code ?? ''] ?? '400 Bad Request'}\r\nConnection: close\r\n\r\n`,
    );
  }
  socket.destroy(err);
}

const STATUS_OF_PARSE_ERROR: Record<string, string> = {
  HPE_HEADER_OVERFLOW: '431 Request Header Fields Too Large',
  HPE_CHUNK_EXTENSIONS_OVERFLOW: '413 Payload Too Large',
  ERR_HTTP_REQUEST_TIMEOUT: '408 Request Timeout',
};
