/**
 * `Expect: 100-continue` done properly. curl sends it before any large
 * upload and waits for the go-ahead; answering 100 at once (Node's default)
 * means a refused upload (unknown VDI, too large, busy) is refused only after
 * the client started pushing gigabytes, which then die in a connection reset
 * instead of reaching the JSON error. So: uploads (PUT) get their 100 only
 * when the body is about to be read; every other request gets it at once.
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

export const continueUnlessUpload: RequestHandler = (req, res, next) => {
  if (req.method !== 'PUT') continueNow(res);
  next();
};
