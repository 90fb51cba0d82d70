/**
 * The progress bar on stderr: bytes done of the total, rate and ETA. Off
 * with --no-progress, and whenever stderr is not a terminal.
 */
import { SingleBar } from 'cli-progress';

const RATE_WINDOW_MS = 5000;

export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${u === 0 ? v : v.toFixed(1)} ${units[u]}`;
}

function formatSeconds(s: number): string {
  if (!Number.isFinite(s)) return '--:--';
  const t = Math.round(s);
  const h = Math.floor(t / 3600);
  const m = Math.floor((t % 3600) / 60);
  const sec = t % 60;
  const mm = String(m).padStart(2, '0');
  const ss = String(sec).padStart(2, '0');
  return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
}

export interface Progress {
  /** Bytes of the total now done (absolute). */
  set(done: number): void;
  /** A line for the user, above the bar. */
  log(line: string): void;
  stop(): void;
}

export function createProgress(label: string, total: number, enabled: boolean): Progress {
  if (!enabled) {
    return {
      set() {},
      log(line) {
        process.stderr.write(`${line}\n`);
      },
      stop() {},
    };
  }
  const bar = new SingleBar({
    format: `${label} [{bar}] {percentage}% | {done} / {size} | {rate} | ETA {left}`,
    barCompleteChar: '#',
    barIncompleteChar: '-',
    hideCursor: true,
    stream: process.stderr,
    fps: 5,
  });
  // The rate over the last few seconds, not since the start: a resume should not look slow forever.
  const samples: { t: number; done: number }[] = [{ t: Date.now(), done: 0 }];
  let current = 0;
  const payload = () => {
    const now = Date.now();
    while (samples.length > 2 && now - samples[1].t > RATE_WINDOW_MS) samples.shift();
    const first = samples[0];
    const rate = now > first.t ? ((current - first.done) * 1000) / (now - first.t) : 0;
    return {
      done: formatBytes(current),
      size: formatBytes(total),
      rate: `${formatBytes(rate)}/s`,
      left: rate > 0 ? formatSeconds((total - current) / rate) : '--:--',
    };
  };
  bar.start(Math.max(total, 1), 0, payload());
  return {
    set(done) {
      if (samples.length === 1 && samples[0].done === 0 && current === 0)
        samples[0] = { t: Date.now(), done };
      current = done;
      samples.push({ t: Date.now(), done });
      bar.update(done, payload());
    },
    log(line) {
      bar.stop();
      process.stderr.write(`${line}\n`);
      bar.start(Math.max(total, 1), current, payload());
    },
    stop() {
      bar.update(current, payload());
      bar.stop();
    },
  };
}
