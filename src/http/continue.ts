/**
 * `Expect: 100-continue` done properly. curl sends it before any large
 * upload and waits for the go-ahead; answering 100 at once (Node's default)
 * means a refused upload (unknown VDI, too large, busy) is refused only after
 * the client started pushing gigabytes, which then die in a connection reset
 * instead of reaching the JSON error. So: uploads (PUT) get their 100 only
 * when the body is about to be read; every other request gets it at once.
 * Uploads also get an idle timeout (see UPLOAD_IDLE_TIMEOUT_MS).
 */
import type { RequestHandler, Response } from 'express';

function expectsContinue(res: Response): boolean {
  return (res.req.headers.expect ?? '').toLowerCase() === '100-continue';
}

/** Tells the client to send its body, once, if it is waiting for that. */
export function continueNow(res: Response): void {
  if (expectsContinue(res) && !res.locals.continued && !res.headersSent) {
    res.locals.continued = true;
    res.writeContinue();
  }
}

/** An upload whose connection delivers nothing for this long is broken (a dropped NAT entry, a dead peer). */
export const UPLOAD_IDLE_TIMEOUT_MS = 120_000;

export const continueUnlessUpload: RequestHandler = (req, res, next) => {
  if (req.method !== 'PUT') continueNow(res);
  // A half-open upload would otherwise hold its session (and the VDI) forever:
  // the server only reads, so nothing ever fails. The bytes that did arrive
  // are kept; the client resumes.
  if (req.method === 'PUT' || req.method === 'PATCH') {
    const socket = req.socket;
    const idle = () => socket.destroy();
    socket.setTimeout(UPLOAD_IDLE_TIMEOUT_MS);
    socket.on('timeout', idle);
    // Not left behind for the next request of a keep-alive connection: one per request piled up.
    res.once('close', () => socket.off('timeout', idle));
  }
  next();
};
