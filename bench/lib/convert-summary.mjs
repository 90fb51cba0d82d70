#!/usr/bin/env node
/**
 * Summarises bench/convert's measurements.
 * Usage: node convert-summary.mjs RESULTS.tsv  (lines: target round seconds bytes cpu-seconds)
 * Prints the median seconds per target with every run, the median CPU
 * seconds (diskport's server process; qemu-img's own) and those CPU seconds
 * per GiB of the operation's wire stream (what curl moved for diskport: the
 * same denominator for every target of one operation), then the ratios the
 * targets are about: diskport / qemu-img per conversion, diskport's import /
 * the same upload into a plain Node server, diskport's export / the same bytes
 * served by a plain Node server and / curl copying them from a local file
 * (and that copy / qemu-img: what curl's file writes alone cost), vhd and qcow2 export / raw export.
 */
import fs from 'node:fs';

const rows = fs
  .readFileSync(process.argv[2], 'utf8')
  .split('\n')
  .filter(Boolean)
  .map((line) => {
    const [target, round, seconds, bytes, cpu] = line.split('\t');
    return { target, round: Number(round), seconds: Number(seconds), bytes: Number(bytes), cpu: Number(cpu) };
  });

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};

const targets = [...new Set(rows.map((r) => r.target))];
const med = {};
const cpu = {};
const GIB = 2 ** 30;
const opOf = (target) => target.split('/')[0];
/** The wire stream of an operation: what curl moved for diskport (qemu-img's outputs are other sizes). */
const streamOf = {};
for (const target of targets.filter((t) => t.endsWith('/diskport'))) {
  streamOf[opOf(target)] = median(rows.filter((r) => r.target === target).map((r) => r.bytes));
}
const cpuPerGib = {};
const lines = ['target                       median s   CPU s  CPU s/GiB   stream MiB   MB/s   runs (s)'];
for (const target of targets) {
  const runs = rows.filter((r) => r.target === target);
  med[target] = median(runs.map((r) => r.seconds));
  cpu[target] = median(runs.map((r) => r.cpu));
  // the wire stream: what curl moved, or for qemu-img the file it wrote (its apparent size)
  const bytes = median(runs.map((r) => r.bytes));
  const stream = streamOf[opOf(target)] ?? bytes;
  cpuPerGib[target] = cpu[target] / (stream / GIB);
  lines.push(
    `${target.padEnd(28)} ${med[target].toFixed(2).padStart(8)}  ${cpu[target].toFixed(2).padStart(6)}` +
      `  ${cpuPerGib[target].toFixed(2).padStart(9)}   ` +
      `${(bytes / 2 ** 20).toFixed(0).padStart(10)}  ${(bytes / med[target] / 1e6).toFixed(0).padStart(5)}   ` +
      runs.map((r) => r.seconds.toFixed(2)).join(' '),
  );
}

const verdict = (ratio, limit) =>
  `${ratio.toFixed(2)}x  (target <= ${limit}x: ${ratio <= limit ? 'met' : 'MISSED'})`;
lines.push('');
for (const op of ['export-vhd', 'export-qcow2', 'import-vhd', 'import-qcow2']) {
  const d = med[`${op}/diskport`];
  const q = med[`${op}/qemu-img`];
  if (d && q) {
    const cd = cpu[`${op}/diskport`];
    const cq = cpu[`${op}/qemu-img`];
    const cpuRatio = cd > 0 && cq > 0 ? `   CPU ${(cd / cq).toFixed(2)}x` : '';
    lines.push(`${`${op} diskport/qemu-img`.padEnd(40)} ${verdict(d / q, 1.5)}${cpuRatio}`);
  }
  const qf = med[`${op}/qemu-img+flush`];
  // durable like diskport's import: the tighter target
  if (d && qf) lines.push(`${`${op} diskport/qemu-img+flush`.padEnd(40)} ${verdict(d / qf, 1.2)}`);
  const pipe = med[`${op}/node-pipe+fsync`];
  if (d && pipe) {
    lines.push(
      `${`${op} diskport/node-pipe+fsync`.padEnd(40)} ${(d / pipe).toFixed(2)}x  (the same PUT, unconverted)`,
    );
  }
  const direct = med[`${op}/node-direct`];
  if (d && direct) {
    lines.push(
      `${`${op} diskport/node-direct`.padEnd(40)} ${(d / direct).toFixed(2)}x  (the same PUT, written with O_DIRECT, unconverted)`,
    );
  }
  const served = med[`${op}/node-pipe`];
  if (d && served) {
    lines.push(
      `${`${op} diskport/node-pipe`.padEnd(40)} ${(d / served).toFixed(2)}x  (the same bytes, served from a file)`,
    );
  }
  // curl copying the same bytes from file:// to a file: no HTTP at all, only curl's writes
  const curlFile = med[`${op}/curl-file`];
  if (d && curlFile) {
    lines.push(
      `${`${op} diskport/curl-file`.padEnd(40)} ${(d / curlFile).toFixed(2)}x  (curl writing the same bytes from a local file)`,
    );
    if (q)
      lines.push(
        `${`${op} curl-file/qemu-img`.padEnd(40)} ${(curlFile / q).toFixed(2)}x  (no HTTP, no conversion)`,
      );
  }
}
lines.push('');
for (const op of Object.keys(streamOf)) {
  const refs = ['qemu-img', 'qemu-img+flush', 'node-pipe', 'node-pipe+fsync', 'node-direct']
    .filter((ref) => cpuPerGib[`${op}/${ref}`] !== undefined)
    .map((ref) => `${ref} ${cpuPerGib[`${op}/${ref}`].toFixed(2)}`);
  lines.push(
    `${`${op} CPU s/GiB`.padEnd(24)} diskport ${cpuPerGib[`${op}/diskport`].toFixed(2)}   ${refs.join('   ')}`,
  );
}
// The raw export goes to /dev/null (its 14 GiB of zeros would price curl's writes):
// the fair comparison is the vhd and qcow2 export to /dev/null too.
const raw = med['export-raw/diskport'];
for (const f of ['vhd', 'qcow2']) {
  const d = med[`export-${f}/diskport-to-null`];
  if (d && raw) lines.push(`${`export ${f}/raw (both to /dev/null)`.padEnd(40)} ${verdict(d / raw, 1.1)}`);
  const toFile = med[`export-${f}/diskport`];
  if (toFile && raw)
    lines.push(`${`export ${f} to a file / raw to /dev/null`.padEnd(40)} ${(toFile / raw).toFixed(2)}x`);
}
console.log(lines.join('\n'));
