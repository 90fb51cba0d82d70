#!/usr/bin/env node
/**
 * The "ceiling" for Node: the plainest HTTP file server there is.
 *   PUT  -> req.pipe(fs.createWriteStream(file))   (default options)
 *   GET  -> fs.createReadStream(file).pipe(res)    (default options)
 * Usage: node pipe-server.mjs PORT FILE
 * GET ?file=PATH serves PATH instead of FILE (a benchmark's other inputs).
 *
 * Two references that price what diskport's import promises on top:
 *   PUT ?fsync=1    fsync the file before answering (durability)
 *   PUT ?durable=1  what a crash-safe replace costs: write a new file beside
 *                   FILE, fsync it, rename it over FILE, fsync the directory
 *                   (diskport lands in a staging file and renames it likewise)
 * GET sets Content-Length from stat, as diskport does, so neither pays for
 * chunked encoding.
 */
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';

const [port, file] = [Number(process.argv[2]), process.argv[3]];
if (!port || !file) {
  console.error('usage: pipe-server.mjs PORT FILE');
  process.exit(2);
}

function fsyncPath(p, flags, cb) {
  fs.open(p, flags, (err, fd) => {
    if (err) return cb(err);
    fs.fsync(fd, (syncErr) => fs.close(fd, (closeErr) => cb(syncErr ?? closeErr)));
  });
}

const server = http.createServer((req, res) => {
  const answer = (err, status = 201) => {
    res.statusCode = err ? 500 : status;
    res.end(err ? String(err) : undefined);
  };
  if (req.method === 'PUT') {
    const durable = req.url.includes('durable=1');
    const fsync = durable || req.url.includes('fsync=1');
    const target = durable ? `${file}.staging` : file;
    const out = fs.createWriteStream(target);
    out.on('error', answer);
    out.on('finish', () => {
      if (!fsync) return answer();
      fsyncPath(target, 'r', (err) => {
        if (err || !durable) return answer(err);
        fs.rename(target, file, (renameErr) => {
          if (renameErr) return answer(renameErr);
          fsyncPath(path.dirname(file), 'r', answer);
        });
      });
    });
    req.pipe(out);
  } else if (req.method === 'GET') {
    const source = new URL(req.url, 'http://x').searchParams.get('file') ?? file;
    fs.stat(source, (err, st) => {
      if (err) return answer(err);
      res.setHeader('Content-Length', st.size);
      res.setHeader('Content-Type', 'application/octet-stream');
      fs.createReadStream(source).pipe(res);
    });
  } else {
    answer(null, 405);
  }
});
server.requestTimeout = 0;
server.listen(port, '127.0.0.1');
const stop = () => server.close(() => process.exit(0));
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
