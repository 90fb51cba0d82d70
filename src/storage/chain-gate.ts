/**
 * Who uses which contents of a chain at rest (storage/contents.ts), so that a
 * merge (storage/merges.ts) writes into a content only when nobody depends on
 * what it holds now:
 *
 * - readers: every image opened of a VDI registers its chain (content ids,
 *   top first) until closed. A merge of child C into parent P waits until
 *   every open chain holding P has C right above it (those never read P
 *   where C is written). New readers cannot break that: nothing names P as
 *   its content any more.
 * - commits: a commit reads its chain to diff against it and names contents
 *   in its transaction. A commit touching a merge's contents stops that merge
 *   (it is idempotent and runs again after), and a merge waits for commits
 *   touching its contents to end. So commits are never held up by a merge.
 *
 * In memory on purpose: a restart ends every reader, commit and merge.
 */
import { CancelledError } from '../errors.js';

/** Why a merge stopped when a commit came first: not a failure, it runs again. */
export class MergePreempted extends CancelledError {
  constructor() {
    super('the merge gave way to a commit to the same chain; it runs again after it');
  }
}

const POLL_MS = 50;

interface RunningMerge {
  ids: ReadonlySet<string>;
  abort: AbortController;
  done: Promise<void>;
}

export class ChainGate {
  private nextId = 1;
  private readonly readers = new Map<number, readonly string[]>();
  private readonly commits = new Map<number, ReadonlySet<string>>();
  private merge: RunningMerge | null = null;

  /** Registers a reader of chain `ids` (top first); the returned function ends it. */
  openReader(ids: readonly string[]): () => void {
    const id = this.nextId++;
    this.readers.set(id, ids);
    return () => {
      this.readers.delete(id);
    };
  }

  /**
   * Before a commit reads or names the contents `idsNow()` returns (read
   * again after any wait): stops a merge into them and waits for it to end.
   * Returns the function that ends the commit's hold.
   */
  async enterCommit(idsNow: () => Iterable<string>): Promise<() => void> {
    for (;;) {
      const ids = new Set(idsNow());
      const m = this.merge;
      if (m && overlaps(m.ids, ids)) {
        m.abort.abort(new MergePreempted());
        await m.done;
        continue;
      }
      const id = this.nextId++;
      this.commits.set(id, ids);
      return () => {
        this.commits.delete(id);
      };
    }
  }

  /**
   * Runs `write` as the one merge writing into `ids`, once no commit touches
   * them and `readersAllow` accepts every open chain. The signal `write`
   * gets aborts when the caller's does, or when a commit needs `ids`.
   */
  async runMerge<T>(
    ids: ReadonlySet<string>,
    readersAllow: (chain: readonly string[]) => boolean,
    signal: AbortSignal,
    write: (signal: AbortSignal) => Promise<T>,
  ): Promise<T> {
    for (;;) {
      signal.throwIfAborted();
      const busy =
        this.merge !== null ||
        [...this.commits.values()].some((c) => overlaps(c, ids)) ||
        ![...this.readers.values()].every(readersAllow);
      if (!busy) break;
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
    const abort = new AbortController();
    let finish!: () => void;
    const merge: RunningMerge = { ids, abort, done: new Promise((resolve) => (finish = resolve)) };
    this.merge = merge;
    const onAbort = () => abort.abort(signal.reason);
    signal.addEventListener('abort', onAbort, { once: true });
    try {
      return await write(abort.signal);
    } finally {
      signal.removeEventListener('abort', onAbort);
      this.merge = null;
      finish();
    }
  }
}

function overlaps(a: ReadonlySet<string>, b: ReadonlySet<string>): boolean {
  for (const x of a) if (b.has(x)) return true;
  return false;
}
