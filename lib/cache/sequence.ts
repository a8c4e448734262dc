/** A sequence as PagedKVCache keeps it: its page list and the bookkeeping every operation updates. */
import { invalid } from '../errors';
import { PageArena, PageSlot } from './page-arena';

export interface Sequence extends PageSlot {
  starts: Int32Array;
  mass: Float64Array;
  count: number;
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

/** pages[0, count) as a view, kept between page-table builds. */
export function pageView(seq: Sequence): Int32Array {
  const view = seq.view;
  // The arena drops the view when the slot moves; reading view.buffer here would cost more.
  if (view !== undefined && view.length === seq.count) return view;
  return (seq.view = seq.pages.subarray(0, seq.count));
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
