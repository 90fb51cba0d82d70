#!/usr/bin/env node
/**
 * The plainest Node server for bench/requests: one file, one `fs.read` per
 * ranged GET, `fs.fstat` per HEAD, one `fs.write` per PUT at the offset its
 * Content-Range names. No framework, no logging, no validation: the ceiling
 * of Node's http for small requests.
 * Usage: node range-server.mjs PORT FILE
 */
import fs from 'node:fs';
import http from 'node:http';

const [port, file] = [Number(process.argv[2]), process.argv[3]];
const fd = fs.openSync(file, 'r+');
const size = fs.fstatSync(fd).size;

http
  .createServer((req, res) => {
    if (req.method === 'PUT') {
      const at = Number(/bytes (\d+)-/.exec(req.headers['content-range'] ?? '')?.[1] ?? 0);
      const parts = [];
      req.on('data', (c) => parts.push(c));
      req.on('end', () => {
        const body = Buffer.concat(parts);
        fs.write(fd, body, 0, body.length, at, () => res.writeHead(204).end());
      });
      return;
    }
    if (req.method === 'HEAD') {
      fs.fstat(fd, (_err, st) =>
        res.writeHead(200, { 'content-length': st.size, 'accept-ranges': 'bytes' }).end(),
      );
      return;
    }
    const m = /bytes=(\d+)-(\d+)/.exec(req.headers.range ?? '');
    const start = m ? Number(m[1]) : 0;
    const end = m ? Math.min(Number(m[2]), size - 1) : size - 1;
    const buf = Buffer.allocUnsafe(end - start + 1);
    fs.read(fd, buf, 0, buf.length, start, (_err, n) => {
      res.writeHead(m ? 206 : 200, {
        'content-length': n,
        ...(m ? { 'content-range': `bytes ${start}-${end}/${size}` } : {}),
      });
      res.end(buf.subarray(0, n));
    });
  })
  .listen(port, '127.0.0.1');
