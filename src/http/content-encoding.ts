/**
 * Image bytes are read as they arrive, never decoded: an upload sent with a
 * Content-Encoding would land its compressed bytes as the disk. So a body
 * other than JSON (which body-parser decodes: gzip, deflate, br) must come
 * as identity; anything else is refused before a byte is read.
 */
import type { RequestHandler } from 'express';
import { ApiError } from '../errors.js';

const JSON_TYPE = /^application\/(?:[\w.+-]+\+)?json\s*(?:;|$)/i;

export const refuseEncodedUploads: RequestHandler = (req, _res, next) => {
  const encoding = (req.headers['content-encoding'] ?? '').trim().toLowerCase();
  if (encoding === '' || encoding === 'identity' || JSON_TYPE.test(req.headers['content-type'] ?? '')) {
    return next();
  }
  next(
    new ApiError(
      'UNSUPPORTED_MEDIA_TYPE',
      `Content-Encoding '${encoding.slice(0, 64)}' is not read on image data: send the image's bytes as they are (no Content-Encoding)`,
    ),
  );
};
