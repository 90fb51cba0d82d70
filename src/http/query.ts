/**
 * One value per query parameter. Express's query parser turns
 * `?format=qcow2&format=qcow2` into an array, which every `typeof === 'string'`
 * check then reads as absent: the parameter would fall back to its default
 * (a qcow2 image written as raw disk bytes). Refuse it instead, on every route.
 */
import type { RequestHandler } from 'express';
import { ApiError } from '../errors.js';

export const rejectRepeatedQuery: RequestHandler = (req, _res, next) => {
  for (const [name, value] of Object.entries(req.query)) {
    if (Array.isArray(value)) {
      // The values are not echoed: the parameter may be a token or session_id.
      return next(
        new ApiError(
          'INVALID_REQUEST',
          `the query parameter '${name}' is given ${value.length} times; give it once`,
          {
            parameter: name,
          },
        ),
      );
    }
  }
  next();
};
