/**
 * PagedKVCache: the keys and values of many sequences in fixed pools of pages, one K and one V pool
 * per layer ([numPages, pageSize, kvHeads, headDim]). A page id names the same slot in every
 * layer's pool, so one allocator and one page table per step serve all layers.
 *
 * Sequences are page lists. Forks share pages and copy one (on every layer) before its first write;
 * a prefix cache lets a new sequence start from pages another one computed; an eviction policy keeps
 * a sequence within its budget by dropping whole pages. Every operation checks all its input and
 * the pages it needs before it changes anything, so a failure leaves the cache as it was.
 *
 * Token coordinates: a sequence's `length` counts the tokens its pages hold now (what the page table
 * and the kernels see); `nextPosition` is the absolute position of its next token, which runs ahead
 * of `length` once pages were evicted. pageStarts gives every page's absolute first position.
 *
 * Quantized pages (`quant: { format, groupSize? }`): each layer keeps quantized pages, with ids from
 * the BlockAllocator as before, and a full-precision tail page per sequence that is quantized when it
 * fills (QuantizedLayers, quantized-layers.ts, keeps both pools). The page table (pageTable, stagePageTable,
 * CacheStep.table) is the one ops.quantizedPagedDecodeAttention and ops.quantizedPagedPrefillAttention
 * (chunked prefill, with CacheStep.cuSeqlensQ) take: quantized ids, then the tail id. Quantized pages are never written again, so forks and the prefix cache share them without
 * copies (a fork copies the tail); the policies drop only pages quantized on every layer. Each layer
 * keeps its own count of quantized pages, so layers may still run ahead of each other.
 */
import { DType, isDType } from '../dtype';
import { errorAtCaller, invalid } from '../errors';
import { appendPagedKV, KVPages } from '../ops/attention';
import { createQuestMeta } from '../ops/quest';
import { PageTable, StagedPageTable } from '../ops/page-table';
import { QuantizedKVPages, TailPages } from '../ops/quant';
import { DeviceName, Tensor } from '../tensor';
import { AllocatorStats, BlockAllocator, checkPositiveInteger } from './block-allocator';
import { EvictionPolicy, ObservationScores, SequenceView } from './policies/policy';
import { CacheStep } from './cache-step';
import { PrefixCache, PrefixCacheStats } from './prefix-cache';
import { checkQuant, QuantizedCacheOptions } from './quant-options';
import { PageArena } from './page-arena';
import { PageTableBuilder } from './page-table-builder';
import { QuantizedLayers, QuantLayer } from './quantized-layers';
import { ensureCapacity, Growth, quantizedSlots, rowProblem, Sequence, tokenIds, WriteItem } from './sequence';

export interface PagedKVCacheOptions {
  layers: number;
  /** Pages in each layer's pool. */
  numPages: number;
  /** Tokens per page: a power of two from 1 to 256. */
  pageSize: number;
  kvHeads: number;
  headDim: number;
  dtype: DType;
  /** Default 'cpu'. */
  device?: DeviceName;
  /** Quantized pages with a full-precision tail page per sequence (dtype f32, f16 or bf16). Default: none. */
  quant?: QuantizedCacheOptions;
  /** With quant: tail pages per layer, so the most sequences holding tokens at once (E_OOM beyond). Default 64; ignored without quant. */
  maxSequences?: number;
  /**
   * Keep Quest page metadata (ops.createQuestMeta) current for every layer: questMeta(layer). With quant,
   * for the quantized pages, from their keys before quantization. Default false.
   */
  quest?: boolean;
  /** Drops pages as sequences grow (StreamingLLM, H2O) or on compress() (SnapKV). */
  policy?: EvictionPolicy;
  /** Remember full prompt pages so that new sequences reuse them. Default false. */
  prefixCache?: boolean;
}

export interface AddSequenceOptions {
  /** The prompt's token ids: with a prefix cache, the longest cached prefix is reused and this sequence's full prompt pages are cached. */
  prompt?: ArrayLike<number>;
}

export interface SequenceInfo {
  /** Tokens the pages hold (the longest any layer has written). */
  length: number;
  /** Absolute position of the next token. */
  nextPosition: number;
  /** Page ids, oldest first. */
  pages: Int32Array;
  /** Absolute position of each page's first token. */
  pageStarts: Int32Array;
  /** Tokens written per layer. */
  written: Int32Array;
  /**
   * Quantized caches only: the sequence's tail page id (the last entry of `pages`), or -1 when every
   * page is quantized (after prefix reuse or truncation to a page boundary; the next token starts one).
   */
  tail?: number;
}

export interface CacheStats extends AllocatorStats {
  sequences: number;
  /** Tokens held over all sequences. */
  tokens: number;
  /** Pages dropped from sequences by the policy. */
  evictedPages: number;
  prefix?: PrefixCacheStats;
  /** Quantized caches only: the tail pages (capacity = maxSequences). */
  tails?: AllocatorStats;
}

export interface StepEntry {
  seq: number;
  /** New tokens for this sequence in the step (1 for decode). */
  tokens: number;
}

export interface PageTableOptions {
  /**
   * Build into buffers the cache keeps instead of new arrays: valid until the cache builds its next
   * table (pageTable with reuseBuffers, stagePageTable, beginStep), which brings the same buffers up to
   * date, copying only the rows that changed when the batch is the same. Read them, never write them.
   * Default false.
   */
  reuseBuffers?: boolean;
}

export interface CompressResult {
  /** Pages dropped from the sequence. */
  evicted: number;
  /** For each KV head, the page ids (in sequence order) that head attends to; the last page is the sequence's last. */
  headPages: Int32Array[];
}

const MAX_PAGE_SIZE = 256;
/** A new sequence's page list until the arena places it. */
const NO_PAGES = new Int32Array(0);
const DEFAULT_MAX_SEQUENCES = 64;

export class PagedKVCache {
  readonly layers: number;
  readonly numPages: number;
  readonly pageSize: number;
  readonly kvHeads: number;
  readonly headDim: number;
  readonly dtype: DType;
  /** 'cpu' or 'cuda:N'. */
  readonly device: string;
  readonly policy: EvictionPolicy | undefined;
  readonly prefix: PrefixCache | undefined;
  /** The quantization options, for a quantized cache. */
  readonly quant: Readonly<Required<QuantizedCacheOptions>> | undefined;
  /** Tail pages per layer of a quantized cache (0 otherwise). */
  readonly maxSequences: number;
  readonly #allocator: BlockAllocator;
  #pools: KVPages[];
  /** A quantized cache's pools (then #pools and #questMeta stay empty). */
  readonly #quantized: QuantizedLayers | undefined;
  /** Per layer, when Quest is on: [numPages, 2, kvHeads, headDim] channel min/max of each page's keys. */
  #questMeta: Tensor[] = [];
  readonly #sequences = new Map<number, Sequence>();
  #nextId = 0;
  #evictedPages = 0;
  /** Bumped by every change to page lists or sharing; a CacheStep is only valid at its version. */
  #version = 0;
  #disposed = false;
  /** Every sequence's page list, for page-table builds that read one buffer. */
  readonly #arena = new PageArena();
  readonly #tables: PageTableBuilder;

  constructor(opts: PagedKVCacheOptions) {
    if (opts === null || typeof opts !== 'object') throw invalid('E_RANGE', 'options', 'an options object', opts);
    if (opts.quest !== undefined && typeof opts.quest !== 'boolean') throw invalid('E_RANGE', 'quest', 'a boolean', opts.quest);
    this.layers = checkPositiveInteger(opts.layers, 'layers');
    this.numPages = checkPositiveInteger(opts.numPages, 'numPages');
    const pageSize = opts.pageSize;
    if (typeof pageSize !== 'number' || !Number.isInteger(pageSize) || pageSize < 1 || pageSize > MAX_PAGE_SIZE || (pageSize & (pageSize - 1)) !== 0) {
      throw invalid('E_RANGE', 'pageSize', `power of two from 1 to ${MAX_PAGE_SIZE}`, pageSize);
    }
    this.pageSize = pageSize;
    this.kvHeads = checkPositiveInteger(opts.kvHeads, 'kvHeads');
    this.headDim = checkPositiveInteger(opts.headDim, 'headDim');
    if (!isDType(opts.dtype)) throw invalid('E_DTYPE', 'dtype', 'one of f32, f16, bf16, fp8e4m3, i8, u8, i32, i64', opts.dtype);
    this.dtype = opts.dtype;
    if (opts.policy !== undefined && (typeof opts.policy !== 'object' || typeof opts.policy?.onGrow !== 'function')) {
      throw invalid('E_RANGE', 'policy', 'an EvictionPolicy (StreamingLLM, H2O, SnapKV)', opts.policy);
    }
    this.policy = opts.policy;
    this.quant = opts.quant === undefined ? undefined : checkQuant(opts.quant, this.dtype, this.headDim);
    const maxSequences = opts.maxSequences === undefined ? DEFAULT_MAX_SEQUENCES : checkPositiveInteger(opts.maxSequences, 'maxSequences');
    this.maxSequences = this.quant ? maxSequences : 0;
    this.#allocator = new BlockAllocator(this.numPages);
    this.prefix = opts.prefixCache ? new PrefixCache(this.#allocator, pageSize) : undefined;
    const shape = [this.numPages, pageSize, this.kvHeads, this.headDim];
    const tensorOpts = { dtype: this.dtype, device: opts.device ?? 'cpu' } as const;
    this.#pools = [];
    try {
      const layout = { layers: this.layers, numPages: this.numPages, pageSize, kvHeads: this.kvHeads, headDim: this.headDim, maxSequences: this.maxSequences, quest: opts.quest ?? false, ...tensorOpts };
      if (this.quant) this.#quantized = new QuantizedLayers({ ...layout, quant: this.quant }, this.#allocator, this.#arena);
      else for (let l = 0; l < this.layers; l++) {
        this.#pools.push({ kPages: Tensor.empty(shape, tensorOpts), vPages: Tensor.empty(shape, tensorOpts) });
        if (opts.quest) this.#questMeta.push(createQuestMeta(this.#pools[l]!.kPages));
      }
    } catch (error) {
      this.disposePools();
      throw error;
    }
    this.device = this.#quantized ? this.#quantized.device : this.#pools[0]!.kPages.device;
    this.#tables = new PageTableBuilder(this.#arena, pageSize, this.quant !== undefined);
  }

  /** A new empty sequence (or one starting with the longest cached prefix of its prompt); returns its id. */
  addSequence(opts: AddSequenceOptions = {}): number {
    this.checkLive();
    const prompt = opts.prompt === undefined ? undefined : tokenIds(opts.prompt);
    const seq: Sequence = {
      pages: NO_PAGES,
      offset: 0,
      view: undefined,
      starts: new Int32Array(4),
      mass: new Float64Array(4),
      count: 0,
      rewrites: 0,
      length: 0,
      end: 0,
      written: new Int32Array(this.layers),
      prompt,
      published: 0,
      tail: -1,
      quantized: new Int32Array(this.layers),
    };
    this.#arena.place(seq, 4, 0);
    if (prompt && this.prefix) {
      // The last prompt token is always recomputed: its logits are what the caller is after.
      const reused = this.prefix.match(prompt, Math.max(0, Math.floor((prompt.length - 1) / this.pageSize)));
      ensureCapacity(this.#arena, seq, reused.length);
      reused.forEach((page, i) => {
        seq.pages[i] = page;
        seq.starts[i] = i * this.pageSize;
      });
      seq.count = seq.published = reused.length;
      seq.length = seq.end = reused.length * this.pageSize;
      seq.written.fill(seq.length);
      // Cached pages are quantized pages in a quantized cache: the sequence starts with no tail.
      seq.quantized.fill(reused.length);
    }
    const id = this.#nextId++;
    this.#sequences.set(id, seq);
    return id;
  }

  /**
   * Writes k, v [n, kvHeads, headDim] as the next n tokens of `layer` of `seq`, growing the sequence
   * when this layer is the first to reach them. For a batch of sequences use beginStep().
   */
  append(seq: number, layer: number, k: Tensor, v: Tensor): void {
    const state = this.sequenceOf(seq);
    this.checkLayer(layer);
    const n = this.checkRows(k, v);
    const writeFrom = state.written[layer]!;
    const growth: Growth = { seq: state, victims: new Int32Array(0), writeFrom, newLength: Math.max(state.length, writeFrom + n), layer, writeEnd: writeFrom + n };
    this.reserve([growth]);
    const start = growth.writeFrom;
    if (this.quant) {
      this.writeQuantized(layer, k, v, [{ seq: state, row: 0, n, from: start }]);
      this.publish(state);
      return;
    }
    const table = this.pageTable([seq]);
    appendPagedKV(k, v, this.#pools[layer]!, table, { batchIndices: new Int32Array(n), positions: Int32Array.from({ length: n }, (_, i) => start + i), questMeta: this.#questMeta[layer] });
    state.written[layer] = start + n;
    this.publish(state);
  }

  /**
   * Grows every listed sequence by its new tokens for all layers at once (pages allocated, shared
   * pages copied, the policy applied), builds the page table and stages it on the device. Then write
   * each layer with step.append(layer, k, v) and run attention with step.table. Every layer of each
   * sequence must hold all its tokens (no layer behind).
   */
  beginStep(entries: readonly StepEntry[]): CacheStep {
    this.checkLive();
    if (!Array.isArray(entries) || entries.length === 0) throw invalid('E_RANGE', 'entries', 'a non-empty array of { seq, tokens }', entries);
    const seen = new Set<number>();
    const growths = entries.map((entry, i) => {
      const state = this.sequenceOf(entry?.seq, `entries[${i}].seq`);
      if (seen.has(entry.seq)) throw invalid('E_RANGE', `entries[${i}].seq`, 'each sequence once per step', entry.seq);
      seen.add(entry.seq);
      const tokens = checkPositiveInteger(entry.tokens, `entries[${i}].tokens`);
      if (state.written.some((w) => w !== state.length)) {
        throw errorAtCaller('E_RANGE', `Expected every layer of sequence ${entry.seq} to hold its ${state.length} tokens for entries[${i}] but some layer is behind`);
      }
      return { seq: state, victims: new Int32Array(0), writeFrom: state.length, newLength: state.length + tokens, writeEnd: state.length + tokens };
    });
    this.reserve(growths);
    const seqIds = entries.map((e) => e.seq);
    return new CacheStep(this, growths.map((g) => g.seq), seqIds, this.stagePageTable(seqIds), growths.map((g) => g.writeFrom), this.#version);
  }

  /** A new sequence sharing every page of `seq` until one of them is written; returns its id. */
  fork(seq: number): number {
    const source = this.sequenceOf(seq);
    if (source.tail >= 0 && this.#quantized!.tails.freeCount === 0) throw this.#quantized!.outOfTails(1, this.stats());
    const child: Sequence = {
      // Until place() below gives the child its own slot, a copy of this one.
      pages: source.pages,
      offset: 0,
      view: undefined,
      starts: source.starts.slice(),
      mass: source.mass.slice(),
      count: source.count,
      rewrites: 0,
      length: source.length,
      end: source.end,
      written: source.written.slice(),
      prompt: source.prompt?.subarray(0, Math.min(source.prompt.length, source.length)),
      published: source.published,
      tail: -1,
      quantized: source.quantized.slice(),
    };
    this.#arena.place(child, source.pages.length, source.count);
    for (let i = 0; i < quantizedSlots(source); i++) this.#allocator.retain(child.pages[i]!);
    if (source.tail >= 0) this.#quantized!.forkTail(source, child);
    const id = this.#nextId++;
    this.#sequences.set(id, child);
    this.#version++;
    return id;
  }

  /** Keeps the first `length` tokens of `seq` and frees the pages past them. */
  truncate(seq: number, length: number): void {
    const state = this.sequenceOf(seq);
    if (typeof length !== 'number' || !Number.isInteger(length) || length < 0 || length > state.length) {
      throw invalid('E_RANGE', 'length', `integer in [0, ${state.length}]`, length);
    }
    const keep = Math.ceil(length / this.pageSize);
    if (this.#quantized) this.#quantized.truncate(state, seq, length);
    else for (let i = keep; i < state.count; i++) this.#allocator.release(state.pages[i]!);
    state.mass.fill(0, keep, state.count);
    state.count = keep;
    state.rewrites++;
    state.length = length;
    state.end = keep === 0 ? 0 : state.starts[keep - 1]! + length - (keep - 1) * this.pageSize;
    for (let l = 0; l < this.layers; l++) state.written[l] = Math.min(state.written[l]!, length);
    if (state.prompt) state.prompt = state.prompt.subarray(0, Math.min(state.prompt.length, length));
    state.published = Math.min(state.published, Math.floor(length / this.pageSize));
    this.#version++;
  }

  /** Releases every page of `seq`; the id is never used again. */
  free(seq: number): void {
    const state = this.sequenceOf(seq);
    for (let i = 0; i < quantizedSlots(state); i++) this.#allocator.release(state.pages[i]!);
    if (state.tail >= 0) this.#quantized!.tails.release(state.tail);
    this.#sequences.delete(seq);
    this.#arena.release(state);
    this.#tables.forget();
    this.#version++;
  }

  /**
   * The CSR page table of `seqIds` (each holding at least one token), in that order. In new arrays,
   * which nothing the cache does later changes, or with reuseBuffers in buffers the cache keeps (see
   * PageTableOptions: no allocation, read-only, valid until the cache builds its next table).
   */
  pageTable(seqIds: readonly number[], opts: PageTableOptions = {}): PageTable {
    return this.buildTable(seqIds, opts.reuseBuffers === true);
  }

  /** pageTable(seqIds) checked and copied to the cache's device once, for every layer of a step; dispose it. */
  stagePageTable(seqIds: readonly number[]): StagedPageTable {
    // Staging copies the arrays at once, so the reused buffers are safe here.
    return new StagedPageTable(this.buildTable(seqIds, true), this.device as DeviceName);
  }

  /** The K and V pools of `layer`, for the attention ops (a quantized cache has quantizedPages and tailPages instead). */
  pages(layer: number): KVPages {
    this.checkLive();
    this.checkLayer(layer);
    if (this.quant) {
      throw errorAtCaller('E_UNSUPPORTED', `Expected a full-precision PagedKVCache for pages(layer) but this one is quantized (${this.quant.format}): use quantizedPages(layer) and tailPages(layer) with ops.quantizedPagedDecodeAttention or ops.quantizedPagedPrefillAttention`);
    }
    return this.#pools[layer]!;
  }

  /** A quantized cache's quantized pages of `layer`, for ops.quantizedPagedDecodeAttention and quantizedPagedPrefillAttention (with tailPages and the cache's page table). */
  quantizedPages(layer: number): QuantizedKVPages {
    return this.quantLayer(layer, 'quantizedPages').quant;
  }

  /** A quantized cache's full-precision tail pool of `layer` ([maxSequences, pageSize, kvHeads, headDim]). */
  tailPages(layer: number): TailPages {
    return this.quantLayer(layer, 'tailPages').tail;
  }

  /**
   * One layer's Quest metadata, for ops.questDecodeAttention / ops.questScores (the cache must have been
   * made with quest: true). A quantized cache's covers its quantized pages (questScores(q,
   * quantizedPages(layer), questMeta(layer), table) then topkPages and quantizedPagedDecodeAttention).
   */
  questMeta(layer: number): Tensor {
    this.checkLive();
    this.checkLayer(layer);
    const meta = this.#quantized ? this.#quantized.layer(layer).questMeta : this.#questMeta[layer];
    if (!meta) throw errorAtCaller('E_UNSUPPORTED', 'Expected a PagedKVCache made with quest: true for questMeta');
    return meta;
  }

  /** @internal The layer's metadata if Quest is on (what appends keep current). */
  questMetaOrUndefined(layer: number): Tensor | undefined {
    return this.#questMeta[layer];
  }

  /**
   * Adds attention mass per page (one entry per page of `seq`, oldest first), e.g. summed over heads
   * and layers by the decode kernel; H2O keeps the pages with the most.
   */
  recordAttentionMass(seq: number, massPerPage: ArrayLike<number>): void {
    const state = this.sequenceOf(seq);
    if (massPerPage === null || typeof massPerPage !== 'object' || massPerPage.length !== state.count) {
      throw invalid('E_SHAPE', 'massPerPage', `${state.count} entries (one per page of sequence ${seq})`, massPerPage);
    }
    for (let i = 0; i < state.count; i++) {
      const m = massPerPage[i]!;
      if (typeof m !== 'number' || !Number.isFinite(m) || m < 0) throw invalid('E_RANGE', `massPerPage[${i}]`, 'finite non-negative number', m);
    }
    for (let i = 0; i < state.count; i++) state.mass[i]! += massPerPage[i]!;
  }

  /** Applies the policy to `seq` now, as if it were growing; returns the pages dropped. */
  evict(seq: number): number {
    const state = this.sequenceOf(seq);
    const victims = this.policy?.onGrow(this.viewOf(state, state.count)) ?? new Int32Array(0);
    this.dropPages(state, victims);
    return victims.length;
  }

  /**
   * One-shot compression by the policy (SnapKV) from observation-window scores: one Float32Array
   * per KV head with one score per token the sequence holds.
   */
  compress(seq: number, scores: ObservationScores): CompressResult {
    const state = this.sequenceOf(seq);
    if (!this.policy?.compress) throw errorAtCaller('E_UNSUPPORTED', `Expected a policy with compress (SnapKV) but the cache has ${this.policy ? this.policy.name : 'none'}`);
    if (!Array.isArray(scores) || scores.length !== this.kvHeads) throw invalid('E_SHAPE', 'scores', `${this.kvHeads} Float32Arrays (one per KV head)`, scores);
    scores.forEach((s, h) => {
      if (!(s instanceof Float32Array) || s.length !== state.length) throw invalid('E_SHAPE', `scores[${h}]`, `a Float32Array of ${state.length} (one per token of sequence ${seq})`, s);
    });
    const { evict, headSlots } = this.policy.compress(this.viewOf(state, state.count), scores);
    const before = state.pages.slice(0, state.count);
    this.dropPages(state, evict);
    return { evicted: evict.length, headPages: headSlots.map((slots) => slots.map((s) => before[s]!)) };
  }

  info(seq: number): SequenceInfo {
    const state = this.sequenceOf(seq);
    return {
      length: state.length,
      nextPosition: state.end,
      pages: state.pages.slice(0, state.count),
      pageStarts: state.starts.slice(0, state.count),
      written: state.written.slice(),
      ...(this.quant ? { tail: state.tail } : {}),
    };
  }

  /** Ids of the sequences alive, in creation order. */
  sequences(): number[] {
    this.checkLive();
    return [...this.#sequences.keys()];
  }

  /** How many owners (sequences, the prefix cache) hold `page`. */
  refCount(page: number): number {
    this.checkLive();
    return this.#allocator.refCount(page);
  }

  stats(): CacheStats {
    this.checkLive();
    let tokens = 0;
    for (const state of this.#sequences.values()) tokens += state.length;
    const stats: CacheStats = { ...this.#allocator.stats(), sequences: this.#sequences.size, tokens, evictedPages: this.#evictedPages };
    if (this.prefix) stats.prefix = this.prefix.stats();
    if (this.#quantized) stats.tails = this.#quantized.tails.stats();
    return stats;
  }

  get disposed(): boolean {
    return this.#disposed;
  }

  /** Frees the page pools now; the cache is unusable afterwards. Safe to call twice. */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    this.disposePools();
    this.#sequences.clear();
    this.#tables.forget();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }

  /** @internal Throws unless the cache is still at `version` (for CacheStep). */
  checkVersion(version: number): void {
    this.checkLive();
    if (version !== this.#version) throw errorAtCaller('E_RANGE', 'Expected a CacheStep of the current cache state but the cache changed (fork, truncate, free, eviction or growth) since the step began');
  }

  /**
   * Works out the victims, copies and new pages of every growth, checks the pool can provide them
   * (counting policy victims and prefix-cache pages that would be freed), then applies them.
   */
  private reserve(growths: Growth[]): void {
    const P = this.pageSize;
    let demand = 0;
    let tailDemand = 0;
    let freedByVictims = 0;
    for (const g of growths) {
      const s = g.seq;
      const newPages = Math.ceil(g.newLength / P) - s.count;
      if (newPages > 0 && this.policy) {
        const victims = this.policy.onGrow(this.viewOf(s, s.count + newPages));
        g.victims = victims;
        for (const slot of victims) if (this.#allocator.refCount(s.pages[slot]!) === 1) freedByVictims++;
      }
      if (!this.quant) {
        demand += Math.max(0, newPages) + this.sharedWrittenPages(s, g.writeFrom, g.newLength);
        continue;
      }
      // New slots take quantized pages, except the last one when the sequence has no tail yet: that takes a tail.
      const needsTail = newPages > 0 && s.tail < 0;
      if (needsTail) tailDemand++;
      demand += Math.max(0, newPages) - (needsTail ? 1 : 0) + this.#quantized!.sharedPages(g);
    }
    const free = this.#allocator.freeCount + freedByVictims;
    if (demand > free && demand > free + (this.prefix?.evictable ?? 0)) throw this.#allocator.outOfPages(demand, this.stats());
    if (tailDemand > (this.#quantized?.tails.freeCount ?? 0)) throw this.#quantized!.outOfTails(tailDemand, this.stats());
    for (const g of growths) {
      const dropped = g.victims.length * P;
      this.dropPages(g.seq, g.victims);
      g.writeFrom -= dropped;
      g.newLength -= dropped;
      g.writeEnd -= dropped;
    }
    if (demand > this.#allocator.freeCount) this.prefix!.evict(demand - this.#allocator.freeCount);
    for (const g of growths) {
      if (this.#quantized) this.#quantized.grow(g);
      else this.grow(g.seq, g.writeFrom, g.newLength);
    }
    this.#version++;
  }

  private buildTable(seqIds: readonly number[], reuseBuffers: boolean): PageTable {
    this.checkLive();
    if (!Array.isArray(seqIds) || seqIds.length === 0) throw invalid('E_RANGE', 'seqIds', 'a non-empty array of sequence ids', seqIds);
    if (!reuseBuffers) return this.#tables.build(this.tableRows(seqIds));
    return this.#tables.rebuild(seqIds) ?? this.#tables.buildKept(seqIds, this.tableRows(seqIds));
  }

  /** The sequences of `seqIds`, each checked to be a row of a page table. */
  private tableRows(seqIds: readonly number[]): Sequence[] {
    const rows = new Array<Sequence>(seqIds.length);
    for (let b = 0; b < seqIds.length; b++) {
      // The error's argument name is only built on failure: this loop runs once per step.
      const state = this.#sequences.get(seqIds[b]!) ?? this.sequenceOf(seqIds[b], `seqIds[${b}]`);
      const problem = rowProblem(state, this.quant !== undefined);
      if (problem !== undefined) throw invalid('E_RANGE', `seqIds[${b}]`, problem, seqIds[b]);
      rows[b] = state;
    }
    return rows;
  }

  /** Pages of `seq` that a write of tokens [from, to) touches and that another owner also holds. */
  private sharedWrittenPages(seq: Sequence, from: number, to: number): number {
    let shared = 0;
    const end = Math.min(seq.count, Math.ceil(to / this.pageSize));
    for (let i = Math.floor(from / this.pageSize); i < end; i++) if (this.#allocator.refCount(seq.pages[i]!) > 1) shared++;
    return shared;
  }

  private grow(seq: Sequence, from: number, to: number): void {
    const P = this.pageSize;
    const end = Math.min(seq.count, Math.ceil(to / P));
    for (let i = Math.floor(from / P); i < end; i++) {
      const page = seq.pages[i]!;
      if (this.#allocator.refCount(page) <= 1) continue;
      seq.pages[i] = this.copyPage(page);
      seq.rewrites++;
    }
    const pagesAfter = Math.ceil(to / P);
    ensureCapacity(this.#arena, seq, pagesAfter);
    for (let i = seq.count; i < pagesAfter; i++) {
      seq.pages[i] = this.#allocator.allocate();
      // Not starts[i - 1] + P: the page before may have been dropped.
      seq.starts[i] = seq.end + i * P - seq.length;
      seq.mass[i] = 0;
    }
    seq.count = Math.max(seq.count, pagesAfter);
    if (to > seq.length) {
      seq.end += to - seq.length;
      seq.length = to;
    }
  }

  /** @internal Writes k, v rows of `items` into `layer` of a quantized cache, whose slots reserve() made (QuantizedLayers.write). */
  writeQuantized(layer: number, k: Tensor, v: Tensor, items: readonly WriteItem[], staged?: { table?: StagedPageTable }): void {
    this.#quantized!.write(layer, k, v, items, staged);
  }

  private quantLayer(layer: number, name: string): QuantLayer {
    this.checkLive();
    this.checkLayer(layer);
    if (!this.#quantized) throw errorAtCaller('E_UNSUPPORTED', `Expected a PagedKVCache made with quant for ${name}(layer) but this one holds full-precision pages: use pages(layer)`);
    return this.#quantized.layer(layer);
  }

  /** Copy-on-write: a fresh page holding `page`'s keys and values on every layer; `page` loses this owner. */
  private copyPage(page: number): number {
    const copy = this.#allocator.allocate();
    for (const [layer, pool] of this.#pools.entries()) {
      // Quest metadata travels with the page: a layer this step does not write keeps valid bounds.
      const meta = this.#questMeta[layer];
      for (const tensor of meta ? [pool.kPages, pool.vPages, meta] : [pool.kPages, pool.vPages]) {
        using dst = tensor.slice(copy, copy + 1);
        using src = tensor.slice(page, page + 1);
        dst.copyFrom(src);
      }
    }
    this.#allocator.release(page);
    return copy;
  }

  /** Drops the pages at ascending `slots` (all full and fully written) and closes the gaps. */
  private dropPages(seq: Sequence, slots: Int32Array): void {
    if (slots.length === 0) return;
    const P = this.pageSize;
    let kept = 0;
    let next = 0;
    for (let i = 0; i < seq.count; i++) {
      if (next < slots.length && slots[next] === i) {
        this.#allocator.release(seq.pages[i]!);
        next++;
        continue;
      }
      seq.pages[kept] = seq.pages[i]!;
      seq.starts[kept] = seq.starts[i]!;
      seq.mass[kept] = seq.mass[i]!;
      kept++;
    }
    seq.mass.fill(0, kept, seq.count);
    seq.count = kept;
    seq.rewrites++;
    const dropped = slots.length * P;
    seq.length -= dropped;
    for (let l = 0; l < this.layers; l++) seq.written[l]! -= dropped;
    // Victims are quantized on every layer (viewOf), so each layer's quantized count loses all of them.
    if (this.quant) for (let l = 0; l < this.layers; l++) seq.quantized[l]! -= slots.length;
    // Positions are no longer contiguous from 0, so the prompt no longer describes the pages.
    seq.prompt = undefined;
    seq.published = 0;
    this.#evictedPages += slots.length;
    this.#version++;
  }

  private viewOf(seq: Sequence, pagesAfter: number): SequenceView {
    // A quantized cache drops only pages quantized on every layer: never the tail, nor a page a layer still holds there.
    const evictable = this.quant ? Math.min(...seq.quantized) : Math.floor(Math.min(...seq.written) / this.pageSize);
    return { pageSize: this.pageSize, pagesAfter, evictable, mass: seq.mass.subarray(0, seq.count) };
  }

  /** @internal Hands the prompt pages that every layer of `seq` now holds in full to the prefix cache. */
  publish(seq: Sequence): void {
    if (!this.prefix || !seq.prompt) return;
    // A quantized cache hands over only pages quantized on every layer (a full tail is not yet).
    const done = this.quant ? Math.min(...seq.quantized) : Math.floor(Math.min(...seq.written) / this.pageSize);
    const full = Math.min(done, Math.floor(seq.prompt.length / this.pageSize));
    if (full <= seq.published) return;
    this.prefix.insert(seq.prompt.subarray(0, full * this.pageSize), seq.pages.subarray(0, full));
    seq.published = full;
  }

  private sequenceOf(seq: unknown, name = 'seq'): Sequence {
    this.checkLive();
    const state = typeof seq === 'number' ? this.#sequences.get(seq) : undefined;
    if (state) return state;
    const freed = typeof seq === 'number' && Number.isInteger(seq) && seq >= 0 && seq < this.#nextId;
    throw invalid('E_RANGE', name, freed ? 'a live sequence id (this one was freed)' : 'a sequence id from addSequence or fork', seq);
  }

  private checkLayer(layer: number): void {
    if (typeof layer !== 'number' || !Number.isInteger(layer) || layer < 0 || layer >= this.layers) {
      throw invalid('E_RANGE', 'layer', `integer in [0, ${this.layers})`, layer);
    }
  }

  /** @internal Checks k and v against the cache's layout (and `rows` rows when given); returns their row count. */
  checkRows(k: Tensor, v: Tensor, rows?: number): number {
    for (const [name, t] of [['k', k], ['v', v]] as const) {
      if (!(t instanceof Tensor)) throw invalid('E_DTYPE', name, 'a Tensor', t);
      t.handle();
      if (t.dtype !== this.dtype) throw invalid('E_DTYPE', `${name}.dtype`, `the cache's dtype ${this.dtype}`, t.dtype);
      if (t.device !== this.device) throw invalid('E_DEVICE', `${name}.device`, `the cache's device ${this.device}`, t.device);
      const expectedRows = rows ?? k.shape[0]!;
      const [n, h, d] = t.shape;
      if (t.shape.length !== 3 || n !== expectedRows || n < 1 || h !== this.kvHeads || d !== this.headDim) {
        const want = `[${rows ?? (name === 'k' ? 'n >= 1' : k.shape[0])}, ${this.kvHeads}, ${this.headDim}]`;
        throw errorAtCaller('E_SHAPE', `Expected shape ${want} for ${name} but received [${t.shape.join(', ')}]`);
      }
    }
    return k.shape[0]!;
  }

  private checkLive(): void {
    if (this.#disposed) throw errorAtCaller('E_DISPOSED', 'Expected a live PagedKVCache but received a disposed one');
  }

  private disposePools(): void {
    for (const pool of this.#pools) {
      pool.kPages.dispose();
      pool.vPages.dispose();
    }
    for (const meta of this.#questMeta) meta.dispose();
    this.#quantized?.dispose();
    this.#pools = [];
    this.#questMeta = [];
  }
}
