#!/usr/bin/env node
/**
 * Summarises bench/raw-throughput's measurements.
 * Usage: node summarize.mjs RESULTS.tsv
 *   (lines: op, target, round, bytes, seconds, server CPU seconds; tab-separated)
 * Prints per op and target the median MB/s (10^6 bytes/s), seconds, server
 * CPU seconds and server CPU seconds per GiB moved with every run, then
 * diskport's ratios to the references.
 */
import fs from 'node:fs';

const rows = fs
  .readFileSync(process.argv[2], 'utf8')
  .split('\n')
  .filter(Boolean)
  .map((line) => {
    const [op, target, round, bytes, seconds, cpu] = line.split('\t');
    return {
      op,
      target,
      round: Number(round),
      bytes: Number(bytes),
      seconds: Number(seconds),
      cpu: Number(cpu),
    };
  });

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};

const TARGETS = ['diskport', 'node', 'nginx', 'node+fsync', 'node+durable'];
const OPS = ['PUT', 'GET', 'GET-cached'];
const med = Object.fromEntries(OPS.map((op) => [op, {}]));
const GIB = 2 ** 30;
const out = ['op          target        MB/s   seconds  server CPU s  CPU s/GiB   every run (MB/s)'];
for (const op of OPS) {
  for (const target of TARGETS) {
    const runs = rows.filter((r) => r.op === op && r.target === target);
    if (!runs.length) continue;
    const mbps = runs.map((r) => r.bytes / r.seconds / 1e6);
    const m = {
      mbps: median(mbps),
      seconds: median(runs.map((r) => r.seconds)),
      cpu: median(runs.map((r) => r.cpu)),
      cpuPerGib: median(runs.map((r) => r.cpu / (r.bytes / GIB))),
    };
    med[op][target] = m;
    out.push(
      `${op.padEnd(11)} ${target.padEnd(12)} ${m.mbps.toFixed(0).padStart(5)}  ${m.seconds.toFixed(2).padStart(8)}` +
        `  ${m.cpu.toFixed(2).padStart(12)}  ${m.cpuPerGib.toFixed(2).padStart(9)}   ${mbps.map((x) => x.toFixed(0)).join(' ')}`,
    );
  }
}
out.push('');
for (const op of OPS) {
  const d = med[op].diskport?.mbps;
  const parts = ['node', 'nginx', 'node+durable']
    .filter((ref) => d && med[op][ref])
    .map((ref) => `diskport/${ref} ${(d / med[op][ref].mbps).toFixed(2)}x`);
  out.push(`${op}: ${parts.join('   ') || 'n/a'}`);
}
for (const op of OPS) {
  const d = med[op].diskport?.cpuPerGib;
  const refs = ['node', 'nginx']
    .filter((ref) => d !== undefined && med[op][ref])
    .map((ref) => `${ref} ${med[op][ref].cpuPerGib.toFixed(2)}`);
  if (d !== undefined) out.push(`${op} server CPU s/GiB: diskport ${d.toFixed(2)}   ${refs.join('   ')}`);
}
const plain = med.PUT.node?.seconds;
for (const [ref, what] of [
  ['node+fsync', 'an fsync of the file'],
  ['node+durable', 'a crash-safe replace (new file, fsync, rename, fsync dir)'],
]) {
  const s = med.PUT[ref]?.seconds;
  if (plain && s)
    out.push(`${what} adds ${(s - plain).toFixed(2)} s to the plain pipe's PUT (${ref} - node, medians)`);
}
console.log(out.join('\n'));
