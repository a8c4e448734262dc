/**
 * QuantizedLayers: the pages of a quantized PagedKVCache, each layer's pool of quantized pages and its
 * full-precision tail pool, with the allocator of tail ids.
 *
 * Kept out of PagedKVCache because it is an idea of its own, the KIVI residual: the newest tokens stay
 * in full precision in a tail page, and a page is quantized only once it is full, so a quantized page
 * is written once and never again. That takes two pools with two id spaces and a seal when the tail
 * fills; the cache keeps the page lists and hands this class the quantized half of growing, writing,
 * forking and truncating them.
 *
 * Each layer has a pool of quantized pages (ops.createQuantizedPages, numPages of them, ids from the
 * cache's BlockAllocator) and a tail pool of `maxSequences` pages (ids from `tails`). The last page of
 * a sequence lives in its tail page; when the tail is full and the next token comes, the layer
 * quantizes it (ops.quantizePages) into the quantized page id its slot got when the sequence grew, and
 * writes on from slot 0 of the same tail. With Quest on, that same call records the page's metadata
 * from its keys before quantization; tail pages have none (questScores scores them +Infinity).
 */
import { DType } from '../dtype';
import { errorAtCaller, KvflashError } from '../errors';
import { appendPagedKV } from '../ops/attention';
import { PageTable, StagedPageTable } from '../ops/page-table';
import { createQuantizedPages, disposeQuantizedPages, QuantizedKVPages, quantizePages, TailPages } from '../ops/quant';
import { createQuestMeta } from '../ops/quest';
import { DeviceName, Tensor } from '../tensor';
import { BlockAllocator } from './block-allocator';
import { PageArena } from './page-arena';
import type { PagedKVCacheOptions } from './paged-kv-cache';
import { QuantizedCacheOptions } from './quant-options';
import { ensureCapacity, Growth, quantizedSlots, Sequence, WriteItem } from './sequence';

export interface QuantLayer {
  quant: QuantizedKVPages;
  tail: TailPages;
  /** With Quest on: [numPages, 2, kvHeads, headDim] min and max keys of each quantized page. */
  questMeta?: Tensor;
}

/** The cache's options, as PagedKVCache checked them. */
export type QuantizedLayersOptions = Required<Pick<PagedKVCacheOptions, 'layers' | 'numPages' | 'pageSize' | 'kvHeads' | 'headDim' | 'dtype' | 'device' | 'maxSequences' | 'quest'>> & {
  quant: Readonly<Required<QuantizedCacheOptions>>;
};

export class QuantizedLayers {
  /** 'cpu' or 'cuda:N', as the tail pools report it. */
  readonly device: string;
  /** Ids of the tail pages (capacity = maxSequences). */
  readonly tails: BlockAllocator;
  readonly #pages: BlockAllocator;
  readonly #arena: PageArena;
  readonly #pageSize: number;
  readonly #kvHeads: number;
  readonly #headDim: number;
  readonly #dtype: DType;
  #layers: QuantLayer[] = [];

  /** Takes every layer's pools now; on failure frees what it took. Quantized page ids come from `pages`, the cache's allocator. */
  constructor(opts: QuantizedLayersOptions, pages: BlockAllocator, arena: PageArena) {
    this.#pages = pages;
    this.#arena = arena;
    this.#pageSize = opts.pageSize;
    this.#kvHeads = opts.kvHeads;
    this.#headDim = opts.headDim;
    this.#dtype = opts.dtype;
    this.tails = new BlockAllocator(opts.maxSequences);
    const tailShape = [opts.maxSequences, opts.pageSize, opts.kvHeads, opts.headDim];
    const tensorOpts = { dtype: opts.dtype, device: opts.device } as const;
    try {
      for (let l = 0; l < opts.layers; l++) {
        const layer: QuantLayer = { quant: undefined!, tail: { kTail: Tensor.empty(tailShape, tensorOpts), vTail: undefined! } };
        this.#layers.push(layer);
        layer.tail.vTail = Tensor.empty(tailShape, tensorOpts);
        layer.quant = createQuantizedPages(opts.numPages, opts.pageSize, opts.kvHeads, opts.headDim, { ...opts.quant, device: opts.device });
        if (opts.quest) layer.questMeta = createQuestMeta(layer.quant, { dtype: opts.dtype });
      }
    } catch (error) {
      this.dispose();
      throw error;
    }
    this.device = this.#layers[0]!.tail.kTail.device;
  }

  layer(layer: number): QuantLayer {
    return this.#layers[layer]!;
  }

  /** The E_OOM for `requested` tail pages, with the cache's stats. */
  outOfTails(requested: number, stats: object): KvflashError {
    const error = errorAtCaller('E_OOM', `Expected ${requested} free tail page(s) but ${this.tails.freeCount} of maxSequences = ${this.tails.capacity} are free (every sequence holding tokens has one; raise maxSequences) (${JSON.stringify(stats)})`);
    return Object.assign(error, { stats });
  }

  /** Gives `child`, a fork of `source` (which has a tail), its own tail page holding a copy of the source's on every layer. */
  forkTail(source: Sequence, child: Sequence): void {
    // Quantized pages are shared as they are; the tail is the sequence's own, so it is copied on every layer.
    child.tail = child.pages[child.count - 1] = this.tails.allocate();
    for (const { tail } of this.#layers) {
      for (const pool of [tail.kTail, tail.vTail]) copyRows(pool, source.tail, child.tail);
    }
  }

  /**
   * Quantized slots a write quantizes ([from, to)): from the first page the writing layer(s) still
   * hold in the tail, up to the page its write ends in (which stays in the tail), existing slots only.
   */
  private writeRange(g: Growth): [number, number] {
    const s = g.seq;
    const from = g.layer === undefined ? Math.min(...s.quantized) : s.quantized[g.layer]!;
    return [from, Math.min(quantizedSlots(s), Math.ceil(g.writeEnd / this.#pageSize) - 1)];
  }

  /** Quantized pages that a write will quantize into and that another owner also holds (a fork taken while a layer was behind). */
  sharedPages(g: Growth): number {
    const [from, to] = this.writeRange(g);
    let shared = 0;
    for (let i = from; i < to; i++) if (this.#pages.refCount(g.seq.pages[i]!) > 1) shared++;
    return shared;
  }

  /**
   * Growth of a quantized cache's sequence: shared pages the write will quantize into are copied; when
   * it reaches new pages, the old tail slot and every new slot but the last get quantized page ids
   * (filled as each layer writes past them) and the last new slot is the tail (allocated if none).
   */
  grow(g: Growth): void {
    const s = g.seq;
    const P = this.#pageSize;
    const [from, to] = this.writeRange(g);
    for (let i = from; i < to; i++) {
      const page = s.pages[i]!;
      if (this.#pages.refCount(page) <= 1) continue;
      s.pages[i] = this.copyPage(page);
      s.rewrites++;
    }
    const pagesAfter = Math.ceil(g.newLength / P);
    if (pagesAfter > s.count) {
      ensureCapacity(this.#arena, s, pagesAfter);
      // The tail's slot gets the quantized page its tail will be quantized into.
      if (s.tail >= 0) s.rewrites++;
      for (let i = quantizedSlots(s); i < pagesAfter - 1; i++) s.pages[i] = this.#pages.allocate();
      if (s.tail < 0) s.tail = this.tails.allocate();
      s.pages[pagesAfter - 1] = s.tail;
      for (let i = s.count; i < pagesAfter; i++) {
        s.starts[i] = s.end + i * P - s.length;
        s.mass[i] = 0;
      }
      s.count = pagesAfter;
    }
    if (g.newLength > s.length) {
      s.end += g.newLength - s.length;
      s.length = g.newLength;
    }
  }

  /** Copy-on-write of a quantized page on every layer (codes, scales, mins); `page` loses this owner. */
  private copyPage(page: number): number {
    const copy = this.#pages.allocate();
    for (const { quant, questMeta } of this.#layers) {
      for (const t of [quant.kCodes, quant.vCodes, quant.kScale, quant.kMin, quant.vScale, quant.vMin, questMeta]) if (t) copyRows(t, page, copy);
    }
    this.#pages.release(page);
    return copy;
  }

  /**
   * Writes k, v rows of `items` into `layer`, whose slots grow() made. Each item's rows fill its tail
   * page from the layer's first unquantized page on; every page the write passes is quantized into
   * its slot's page id. When no item passes more than a full tail (decode and short chunks) that is
   * one quantizePages call for the full tails and one append into the tail pool (`staged` keeps that
   * append's table for the other layers of a step); otherwise the pages go through a scratch pool of
   * the pages written.
   */
  write(layer: number, k: Tensor, v: Tensor, items: readonly WriteItem[], staged?: { table?: StagedPageTable }): void {
    const P = this.#pageSize;
    const { quant, tail, questMeta } = this.#layers[layer]!;
    const batch = items.length;
    const first = new Int32Array(batch);
    const last = new Int32Array(batch);
    const sealSrc: number[] = [];
    const sealDst: number[] = [];
    let direct = true;
    items.forEach((it, b) => {
      first[b] = it.seq.quantized[layer]!;
      last[b] = Math.ceil((it.from + it.n) / P) - 1;
      if (last[b] === first[b]) return;
      if (last[b] === first[b]! + 1 && it.from === last[b]! * P) {
        sealSrc.push(it.seq.tail);
        sealDst.push(it.seq.pages[first[b]!]!);
      } else {
        direct = false;
      }
    });
    const rows = k.shape[0]!;
    const batchIndices = new Int32Array(rows);
    const positions = new Int32Array(rows);
    const indptr = new Int32Array(batch + 1);
    const lastPageLen = new Int32Array(batch);
    // Rows go to pages numbered from each item's first page written, except in the direct case (from its last).
    items.forEach((it, b) => {
      const base = (direct ? last[b]! : first[b]!) * P;
      for (let j = 0; j < it.n; j++) {
        batchIndices[it.row + j] = b;
        positions[it.row + j] = it.from + j - base;
      }
      indptr[b + 1] = indptr[b]! + (direct ? 1 : last[b]! - first[b]! + 1);
      lastPageLen[b] = it.from + it.n - last[b]! * P;
    });
    if (direct) {
      if (sealSrc.length > 0) quantizePages({ kSrc: tail.kTail, vSrc: tail.vTail, srcPages: Int32Array.from(sealSrc), dstPages: Int32Array.from(sealDst), questMeta }, quant);
      let table: PageTable | StagedPageTable = { indptr, indices: Int32Array.from(items, (it) => it.seq.tail), lastPageLen };
      if (staged) table = staged.table ??= new StagedPageTable(table, this.device as DeviceName);
      appendPagedKV(k, v, { kPages: tail.kTail, vPages: tail.vTail }, table, { batchIndices, positions });
    } else {
      const scratchShape = [indptr[batch]!, P, this.#kvHeads, this.#headDim];
      using kScratch = Tensor.empty(scratchShape, { dtype: this.#dtype, device: this.device as DeviceName });
      using vScratch = Tensor.empty(scratchShape, { dtype: this.#dtype, device: this.device as DeviceName });
      const src: number[] = [];
      const dst: number[] = [];
      items.forEach((it, b) => {
        // The tokens the layer already holds in its tail start the first scratch page.
        if (it.from > first[b]! * P) {
          copyRows(kScratch, it.seq.tail, indptr[b]!, tail.kTail);
          copyRows(vScratch, it.seq.tail, indptr[b]!, tail.vTail);
        }
        for (let page = first[b]!; page < last[b]!; page++) {
          src.push(indptr[b]! + page - first[b]!);
          dst.push(it.seq.pages[page]!);
        }
      });
      const indices = Int32Array.from({ length: indptr[batch]! }, (_, i) => i);
      appendPagedKV(k, v, { kPages: kScratch, vPages: vScratch }, { indptr, indices, lastPageLen }, { batchIndices, positions });
      if (src.length > 0) quantizePages({ kSrc: kScratch, vSrc: vScratch, srcPages: Int32Array.from(src), dstPages: Int32Array.from(dst), questMeta }, quant);
      items.forEach((it, b) => {
        copyRows(tail.kTail, indptr[b + 1]! - 1, it.seq.tail, kScratch);
        copyRows(tail.vTail, indptr[b + 1]! - 1, it.seq.tail, vScratch);
      });
    }
    items.forEach((it, b) => {
      it.seq.quantized[layer] = last[b]!;
      it.seq.written[layer] = it.from + it.n;
    });
  }

  /**
   * The quantized half of truncating sequence `seq` to `length`, checked before it changes anything:
   * within the tail page the tail is simply cut (nothing to do here); before it only to a page
   * boundary that every layer has quantized (a quantized page cannot be cut), dropping the tail and
   * the quantized pages past `length`.
   */
  truncate(state: Sequence, seq: number, length: number): void {
    const P = this.#pageSize;
    const quantized = quantizedSlots(state);
    const keep = Math.ceil(length / P);
    if (state.tail >= 0 && length > quantized * P) return;
    if (length % P !== 0) {
      const within = state.tail < 0 ? '' : `above ${quantized * P} (within its tail page) or `;
      throw errorAtCaller('E_UNSUPPORTED', `Expected a length for truncate of sequence ${seq} ${within}at a page boundary (a multiple of ${P}) but received ${length}: a quantized page cannot be cut`);
    }
    for (let l = 0; l < this.#layers.length; l++) {
      if (state.written[l]! < length || state.quantized[l]! < keep) {
        throw errorAtCaller('E_UNSUPPORTED', `Expected every layer of sequence ${seq} to have written and quantized its first ${keep} page(s) for truncate to ${length} but layer ${l} has written ${state.written[l]} tokens and quantized ${state.quantized[l]} page(s) (write that layer on first)`);
      }
    }
    for (let i = keep; i < quantized; i++) this.#pages.release(state.pages[i]!);
    if (state.tail >= 0) this.tails.release(state.tail);
    state.tail = -1;
    state.quantized.fill(keep);
  }

  /** Frees every pool now. Safe to call twice. */
  dispose(): void {
    for (const { quant, tail, questMeta } of this.#layers) {
      if (quant) disposeQuantizedPages(quant);
      tail.kTail?.dispose();
      tail.vTail?.dispose();
      questMeta?.dispose();
    }
    this.#layers = [];
  }
}

/** Copies row `from` of `source` (default `t` itself) into row `to` of `t` (dim 0: pages). */
function copyRows(t: Tensor, from: number, to: number, source: Tensor = t): void {
  using dst = t.slice(to, to + 1);
  using src = source.slice(from, from + 1);
  dst.copyFrom(src);
}
