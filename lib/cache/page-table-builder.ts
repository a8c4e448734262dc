/**
 * PageTableBuilder: the CSR page tables of a cache's sequences, in new arrays or in buffers it keeps.
 *
 * A full build gathers every row's page list from the arena in one native call (copySegments): from
 * JS it would take a TypedArray.set per row, ~12 ns a call however short the row, a quarter of the
 * ~45 us of 1024 rows of 256 pages. The copy itself is ~20 us while the lists are in the CPU's caches
 * and several times that when they are not. A decoding loop asks for the table of the same batch every
 * step, and between two steps most rows only gained tokens within their last page, a few gained a
 * page, and page ids are replaced only by copy-on-write, eviction and truncation. So the kept buffers
 * remember the batch they hold, and a build of that batch again copies only what changed:
 *   - no row's page count changed: the rows whose page ids were replaced are copied over in place;
 *   - else the table is rewritten into the other of two regions, front to back: runs of rows whose
 *     entries are still right are copied from the old table (one copyWithin per run, the copy
 *     streaming through memory), a row that gained pages ends a run and then gets its new pages, and
 *     a row whose page ids were replaced is copied from its sequence.
 */
import { copySegments, PageTable } from '../ops/page-table';
import { PageArena } from './page-arena';
import { copyPages, rowProblem, Sequence } from './sequence';

export class PageTableBuilder {
  readonly #arena: PageArena;
  readonly #pageSize: number;
  readonly #quantized: boolean;
  #indptr = new Int32Array(1);
  #lastPageLen = new Int32Array(0);
  /** Two regions of #region entries; the kept table starts at #at (0 or #region). */
  #store = new Int32Array(0);
  #region = 0;
  #at = 0;
  /** Rows the kept table holds (0: none that a build may reuse), their ids and sequences. */
  #batch = 0;
  #ids = new Float64Array(0);
  #rows: Sequence[] = [];
  /** Each row's sequence's rewrites when its page ids were copied, and where they were in the arena. */
  #rewrites = new Float64Array(0);
  #starts = new Int32Array(0);

  constructor(arena: PageArena, pageSize: number, quantized: boolean) {
    this.#arena = arena;
    this.#pageSize = pageSize;
    this.#quantized = quantized;
  }

  /** The table of `rows` in new arrays. */
  build(rows: readonly Sequence[]): PageTable {
    const batch = rows.length;
    const indptr = new Int32Array(batch + 1);
    const lastPageLen = new Int32Array(batch);
    const starts = new Int32Array(batch);
    let total = 0;
    for (let b = 0; b < batch; b++) {
      const seq = rows[b]!;
      starts[b] = seq.offset;
      total += seq.count;
      indptr[b + 1] = total;
      lastPageLen[b] = seq.length - (seq.count - 1) * this.#pageSize;
    }
    const indices = new Int32Array(total);
    copySegments(this.#arena.data, starts, indices, indptr);
    return { indptr, indices, lastPageLen };
  }

  /** The table of `rows` (the sequences of `seqIds`, checked) in the kept buffers. */
  buildKept(seqIds: readonly number[], rows: Sequence[]): PageTable {
    const batch = rows.length;
    if (this.#ids.length < batch) {
      const capacity = Math.max(batch, 2 * this.#ids.length);
      this.#ids = new Float64Array(capacity);
      this.#rewrites = new Float64Array(capacity);
      this.#starts = new Int32Array(capacity);
      this.#lastPageLen = new Int32Array(capacity);
      this.#indptr = new Int32Array(capacity + 1);
    }
    const indptr = this.#indptr;
    let total = 0;
    for (let b = 0; b < batch; b++) {
      const seq = rows[b]!;
      this.#ids[b] = seqIds[b]!;
      this.#rewrites[b] = seq.rewrites;
      this.#starts[b] = seq.offset;
      total += seq.count;
      indptr[b + 1] = total;
      this.#lastPageLen[b] = seq.length - (seq.count - 1) * this.#pageSize;
    }
    this.#rows = rows;
    this.#batch = batch;
    if (total > this.#region) this.grow(total, 0);
    const table = this.table();
    copySegments(this.#arena.data, this.#starts.subarray(0, batch), table.indices, table.indptr);
    return table;
  }

  /**
   * The kept table again, brought up to date, when `seqIds` is the batch it holds; otherwise, or when
   * a row can no longer be in a table, undefined (the caller looks the sequences up, which reports the
   * problem).
   */
  rebuild(seqIds: readonly number[]): PageTable | undefined {
    const batch = this.#batch;
    if (batch === 0 || seqIds.length !== batch) return undefined;
    const ids = this.#ids;
    const rows = this.#rows;
    const indptr = this.#indptr;
    let moved = false;
    let total = 0;
    for (let b = 0; b < batch; b++) {
      const seq = rows[b]!;
      if (seqIds[b] !== ids[b] || rowProblem(seq, this.#quantized) !== undefined) return undefined;
      if (seq.count !== indptr[b + 1]! - indptr[b]!) moved = true;
      total += seq.count;
    }
    if (moved) {
      this.rewrite(total);
      return this.table();
    }
    const store = this.#store;
    const rewrites = this.#rewrites;
    const lastPageLen = this.#lastPageLen;
    for (let b = 0; b < batch; b++) {
      const seq = rows[b]!;
      lastPageLen[b] = seq.length - (seq.count - 1) * this.#pageSize;
      if (seq.rewrites === rewrites[b]) continue;
      copyPages(seq, store, this.#at + indptr[b]!);
      rewrites[b] = seq.rewrites;
    }
    return this.table();
  }

  /** Drops the record of the kept table's batch (a sequence was freed: its id must not be served from it). */
  forget(): void {
    this.#batch = 0;
    this.#rows = [];
  }

  /** The kept batch's table, `total` entries, written into the other region from the one it is in. */
  private rewrite(total: number): void {
    if (total > this.#region) this.grow(total, this.#indptr[this.#batch]!);
    const store = this.#store;
    const from = this.#at;
    const to = from === 0 ? this.#region : 0;
    const rows = this.#rows;
    const indptr = this.#indptr;
    const rewrites = this.#rewrites;
    const lastPageLen = this.#lastPageLen;
    const pageSize = this.#pageSize;
    let oldStart = 0;
    let newStart = 0;
    // The pending run: old entries from runFrom on go to runTo on (none while runFrom < 0).
    let runFrom = -1;
    let runTo = 0;
    for (let b = 0; b < this.#batch; b++) {
      const seq = rows[b]!;
      const count = seq.count;
      const oldEnd = indptr[b + 1]!;
      const held = oldEnd - oldStart;
      if (seq.rewrites === rewrites[b] && count >= held) {
        // What the row held is still right (a list that lost pages was rewritten).
        if (runFrom < 0) {
          runFrom = oldStart;
          runTo = newStart;
        }
        if (count > held) {
          store.copyWithin(to + runTo, from + runFrom, from + oldEnd);
          runFrom = -1;
          const pages = seq.pages;
          for (let i = held; i < count; i++) store[to + newStart + i] = pages[i]!;
        }
      } else {
        if (runFrom >= 0) store.copyWithin(to + runTo, from + runFrom, from + oldStart);
        runFrom = -1;
        copyPages(seq, store, to + newStart);
        rewrites[b] = seq.rewrites;
      }
      indptr[b + 1] = newStart + count;
      lastPageLen[b] = seq.length - (count - 1) * pageSize;
      oldStart = oldEnd;
      newStart += count;
    }
    if (runFrom >= 0) store.copyWithin(to + runTo, from + runFrom, from + oldStart);
    this.#at = to;
  }

  /** Regions of at least `total` entries, the kept table's first `keep` entries carried over. */
  private grow(total: number, keep: number): void {
    const region = Math.max(total, 2 * this.#region);
    const store = new Int32Array(2 * region);
    store.set(this.#store.subarray(this.#at, this.#at + keep));
    this.#store = store;
    this.#region = region;
    this.#at = 0;
  }

  private table(): { indptr: Int32Array; indices: Int32Array; lastPageLen: Int32Array } {
    const batch = this.#batch;
    const at = this.#at;
    return {
      indptr: this.#indptr.subarray(0, batch + 1),
      indices: this.#store.subarray(at, at + this.#indptr[batch]!),
      lastPageLen: this.#lastPageLen.subarray(0, batch),
    };
  }
}
