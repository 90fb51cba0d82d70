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
 *   PUT ?direct=1   the body written with O_DIRECT from aligned buffers, then
 *                   fdatasync: the floor for a Node import that writes as diskport does
 *   PUT ?durable=1  what a crash-safe replace costs: write a new file beside
 *                   FILE, fsync it, rename it over FILE, fsync the directory
 *                   (diskport lands in a staging file and renames it likewise)
 * GET sets Content-Length from stat, as diskport does, so neither pays for
 * chunked encoding.
 */
import fs, { promises as fsp } from 'node:fs';
import http from 'node:http';
import { createRequire } from 'node:module';
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

/**
 * The plainest receiver that writes as diskport's imports do: the body copied
 * into 4 MiB aligned buffers, each written with O_DIRECT while the next
 * fills, then one fdatasync. Needs the project's addon (npm ci builds it).
 */
const DIRECT_BYTES = 4 * 1024 * 1024;
let directBuffers = null;
async function putDirect(req) {
  if (!directBuffers) {
    const addon = createRequire(import.meta.url)('../../build/Release/seek_hole.node');
    directBuffers = [0, 1].map(() => addon.alignedBuffer(DIRECT_BYTES, 4096));
  }
  const out = await fsp.open(
    file,
    fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_TRUNC | fs.constants.O_DIRECT,
  );
  try {
    let [fill, turn, pos, inFlight] = [0, 0, 0, Promise.resolve()];
    const submit = async (length) => {
      await inFlight;
      // O_DIRECT wants whole blocks: the file's tail is rounded up, then cut back.
      inFlight = out.write(directBuffers[turn], 0, Math.ceil(length / 4096) * 4096, pos);
      [pos, turn, fill] = [pos + length, 1 - turn, 0];
    };
    for await (const chunk of req) {
      for (let at = 0; at < chunk.length; ) {
        const n = chunk.copy(directBuffers[turn], fill, at);
        [fill, at] = [fill + n, at + n];
        if (fill === DIRECT_BYTES) await submit(fill);
      }
    }
    if (fill > 0) await submit(fill);
    await inFlight;
    await out.truncate(pos);
    await out.datasync();
  } finally {
    await out.close();
  }
}

const server = http.createServer((req, res) => {
  const answer = (err, status = 201) => {
    res.statusCode = err ? 500 : status;
    res.end(err ? String(err) : undefined);
  };
  if (req.method === 'PUT' && req.url.includes('direct=1')) {
    putDirect(req).then(() => answer(), answer);
  } else if (req.method === 'PUT') {
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
