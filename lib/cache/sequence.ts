/** A sequence as PagedKVCache keeps it: its page list and the bookkeeping every operation updates. */
import { invalid } from '../errors';
import { PageArena, PageSlot } from './page-arena';

export interface Sequence extends PageSlot {
  starts: Int32Array;
  mass: Float64Array;
  count: number;
  /**
   * Bumped whenever a page id in pages[0, count) is replaced or the list shrinks (copy-on-write,
   * eviction, truncation): with count, what tells a reused page table which rows it must rewrite.
   */
  rewrites: number;
  length: number;
  /** Absolute position after the last token held; runs ahead of length once pages were dropped. */
  end: number;
  written: Int32Array;
  /** Prompt tokens still known to match the pages (cleared by eviction, cut by truncate). */
  prompt: Int32Array | undefined;
  /** Leading pages already handed to the prefix cache. */
  published: number;
  /** Quantized caches: the tail id (pages[count - 1]), or -1 when every page is quantized. */
  tail: number;
  /** Quantized caches: per layer, the leading slots whose quantized page holds that layer's data; the layer's tail holds the next. */
  quantized: Int32Array;
}

/** What growing one sequence needs, worked out before anything changes. */
export interface Growth {
  seq: Sequence;
  victims: Int32Array;
  /** Where writes start and the length they reach, before the victims are dropped. */
  writeFrom: number;
  newLength: number;
  /** The layer that writes (single-sequence append), or undefined for every layer (a step). */
  layer?: number;
  /** Where that write ends. */
  writeEnd: number;
}

/** One sequence's rows of a layer write: k, v rows [row, row + n) go to slots [from, from + n). */
export interface WriteItem {
  seq: Sequence;
  row: number;
  n: number;
  from: number;
}

/** The prompt as token ids, checked. */
export function tokenIds(prompt: ArrayLike<number>): Int32Array {
  if (prompt instanceof Int32Array) return prompt.slice();
  if (prompt === null || typeof prompt !== 'object' || typeof prompt.length !== 'number') throw invalid('E_DTYPE', 'prompt', 'an array of token ids', prompt);
  const out = new Int32Array(prompt.length);
  for (let i = 0; i < prompt.length; i++) {
    const t = prompt[i];
    if (typeof t !== 'number' || !Number.isInteger(t) || t < 0 || t > 2 ** 31 - 1) throw invalid('E_RANGE', `prompt[${i}]`, 'a non-negative 32-bit token id', t);
    out[i] = t;
  }
  return out;
}

/** Why `seq` cannot be a row of a page table (the expectation an E_RANGE states), or undefined when it can. */
export function rowProblem(seq: Sequence, quantized: boolean): string | undefined {
  if (seq.length === 0) return 'a sequence holding at least one token';
  if (quantized && seq.tail < 0) {
    return 'a sequence whose last page is a full-precision tail (every page of this one is quantized, after prefix reuse or truncation to a page boundary: append a token first)';
  }
  return undefined;
}

/** Entries past a sequence's cached view that copyPages copies one by one before it makes a new view. */
const LOOSE_PAGES = 8;

/**
 * Copies pages[0, count) of `seq` into `out` from `at`: most of it through the view the sequence keeps
 * (one TypedArray.set), the pages added since that view was made one by one. Making a view costs more
 * than copying a few entries, and a decoding sequence gains a page every pageSize tokens, so the view
 * is made again only when it is LOOSE_PAGES behind, longer than the list, or gone (its slot moved).
 */
export function copyPages(seq: Sequence, out: Int32Array, at: number): void {
  const count = seq.count;
  let view = seq.view;
  if (view === undefined || view.length > count || count - view.length > LOOSE_PAGES) view = seq.view = seq.pages.subarray(0, count);
  out.set(view, at);
  const pages = seq.pages;
  for (let i = view.length; i < count; i++) out[at + i] = pages[i]!;
}

/** Grows the sequence's arrays to hold `pages` pages (its page list moves to a new slot of `arena`). */
export function ensureCapacity(arena: PageArena, seq: Sequence, pages: number): void {
  if (pages <= seq.pages.length) return;
  const capacity = Math.max(pages, seq.pages.length * 2);
  arena.place(seq, capacity, seq.count);
  const starts = new Int32Array(capacity);
  starts.set(seq.starts);
  seq.starts = starts;
  const mass = new Float64Array(capacity);
  mass.set(seq.mass);
  seq.mass = mass;
}

/** A quantized cache's slots that hold quantized page ids: all but the tail slot. */
export function quantizedSlots(seq: Sequence): number {
  return seq.tail >= 0 ? seq.count - 1 : seq.count;
}
