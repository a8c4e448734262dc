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
 * Quantized pages (`quant: { format, groupSize? }`): each layer has a pool of quantized pages
 * (ops.createQuantizedPages, numPages of them, ids from the BlockAllocator as before) and a
 * full-precision tail pool of `maxSequences` pages (ids from a second allocator). The last page of a
 * sequence lives in its tail page; when the tail is full and the next token comes, the layer
 * quantizes it (ops.quantizePages) into the quantized page id its slot got when the sequence grew,
 * and writes on from slot 0 of the same tail. The page table (pageTable, stagePageTable,
 * CacheStep.table) is the one ops.quantizedPagedDecodeAttention and ops.quantizedPagedPrefillAttention
 * (chunked prefill, with CacheStep.cuSeqlensQ) take: quantized ids, then the tail id. Quantized pages are never written again, so forks and the prefix cache share them without
 * copies (a fork copies the tail); the policies drop only pages quantized on every layer. Each layer
 * keeps its own count of quantized pages, so layers may still run ahead of each other.
 */
import { DType, isDType } from '../dtype';
import { errorAtCaller, invalid, KvflashError } from '../errors';
import { appendPagedKV, KVPages } from '../ops/attention';
import { createQuestMeta } from '../ops/quest';
import { PageTable, StagedPageTable } from '../ops/page-table';
import { createQuantizedPages, disposeQuantizedPages, QuantizedKVPages, quantizePages, TailPages } from '../ops/quant';
import { DeviceName, Tensor } from '../tensor';
import { AllocatorStats, BlockAllocator, checkPositiveInteger } from './block-allocator';
import { EvictionPolicy, ObservationScores, SequenceView } from './policies/policy';
import { CacheStep } from './cache-step';
import { PrefixCache, PrefixCacheStats } from './prefix-cache';
import { checkQuant, QuantizedCacheOptions } from './quant-options';
import { PageArena } from './page-arena';
import { PageTableBuilder } from './page-table-builder';
import { ensureCapacity, quantizedSlots, rowProblem, Sequence, tokenIds, WriteItem } from './sequence';

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
  /** Keep Quest page metadata (ops.createQuestMeta) current for every layer: questMeta(layer). Default false. */
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

/** What growing one sequence needs, worked out before anything changes. */
interface Growth {
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

interface QuantLayer {
  quant: QuantizedKVPages;
  tail: TailPages;
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
  readonly #tails: BlockAllocator | undefined;
  #pools: KVPages[];
  #quantLayers: QuantLayer[] = [];
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
    if (this.quant && opts.quest) throw errorAtCaller('E_UNSUPPORTED', 'Expected quest or quant but received both: Quest metadata is kept over full-precision pages only');
    const maxSequences = opts.maxSequences === undefined ? DEFAULT_MAX_SEQUENCES : checkPositiveInteger(opts.maxSequences, 'maxSequences');
    this.maxSequences = this.quant ? maxSequences : 0;
    this.#allocator = new BlockAllocator(this.numPages);
    this.#tails = this.quant ? new BlockAllocator(this.maxSequences) : undefined;
    this.prefix = opts.prefixCache ? new PrefixCache(this.#allocator, pageSize) : undefined;
    const shape = [this.numPages, pageSize, this.kvHeads, this.headDim];
    const tensorOpts = { dtype: this.dtype, device: opts.device ?? 'cpu' } as const;
    this.#pools = [];
    try {
      for (let l = 0; l < this.layers; l++) {
        if (this.quant) {
          const tailShape = [this.maxSequences, pageSize, this.kvHeads, this.headDim];
          const layer: QuantLayer = { quant: undefined!, tail: { kTail: Tensor.empty(tailShape, tensorOpts), vTail: undefined! } };
          this.#quantLayers.push(layer);
          layer.tail.vTail = Tensor.empty(tailShape, tensorOpts);
          layer.quant = createQuantizedPages(this.numPages, pageSize, this.kvHeads, this.headDim, { ...this.quant, device: tensorOpts.device });
          continue;
        }
        this.#pools.push({ kPages: Tensor.empty(shape, tensorOpts), vPages: Tensor.empty(shape, tensorOpts) });
        if (opts.quest) this.#questMeta.push(createQuestMeta(this.#pools[l]!.kPages));
      }
    } catch (error) {
      this.disposePools();
      throw error;
    }
    this.device = this.quant ? this.#quantLayers[0]!.tail.kTail.device : this.#pools[0]!.kPages.device;
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
    if (source.tail >= 0 && this.#tails!.freeCount === 0) throw this.outOfTails(1);
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
    if (source.tail >= 0) {
      // Quantized pages are shared as they are; the tail is the sequence's own, so it is copied on every layer.
      child.tail = child.pages[child.count - 1] = this.#tails!.allocate();
      for (const { tail } of this.#quantLayers) {
        for (const pool of [tail.kTail, tail.vTail]) copyRows(pool, source.tail, child.tail);
      }
    }
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
    if (this.quant) {
      this.truncateQuantized(state, seq, length);
      return;
    }
    for (let i = keep; i < state.count; i++) this.#allocator.release(state.pages[i]!);
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
    if (state.tail >= 0) this.#tails!.release(state.tail);
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

  /** One layer's Quest metadata, for ops.questScores (the cache must have been made with quest: true). */
  questMeta(layer: number): Tensor {
    this.checkLive();
    this.checkLayer(layer);
    const meta = this.#questMeta[layer];
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
    if (this.#tails) stats.tails = this.#tails.stats();
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
      demand += Math.max(0, newPages) - (needsTail ? 1 : 0) + this.sharedQuantizedPages(g);
    }
    const free = this.#allocator.freeCount + freedByVictims;
    if (demand > free && demand > free + (this.prefix?.evictable ?? 0)) throw this.#allocator.outOfPages(demand, this.stats());
    if (tailDemand > (this.#tails?.freeCount ?? 0)) throw this.outOfTails(tailDemand);
    for (const g of growths) {
      const dropped = g.victims.length * P;
      this.dropPages(g.seq, g.victims);
      g.writeFrom -= dropped;
      g.newLength -= dropped;
      g.writeEnd -= dropped;
    }
    if (demand > this.#allocator.freeCount) this.prefix!.evict(demand - this.#allocator.freeCount);
    for (const g of growths) {
      if (this.quant) this.growQuantized(g);
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

  /**
   * Quantized slots a write quantizes ([from, to)): from the first page the writing layer(s) still
   * hold in the tail, up to the page its write ends in (which stays in the tail), existing slots only.
   */
  private quantizedWriteRange(g: Growth): [number, number] {
    const s = g.seq;
    const from = g.layer === undefined ? Math.min(...s.quantized) : s.quantized[g.layer]!;
    return [from, Math.min(quantizedSlots(s), Math.ceil(g.writeEnd / this.pageSize) - 1)];
  }

  /** Quantized pages that a write will quantize into and that another owner also holds (a fork taken while a layer was behind). */
  private sharedQuantizedPages(g: Growth): number {
    const [from, to] = this.quantizedWriteRange(g);
    let shared = 0;
    for (let i = from; i < to; i++) if (this.#allocator.refCount(g.seq.pages[i]!) > 1) shared++;
    return shared;
  }

  /**
   * Growth of a quantized cache's sequence: shared pages the write will quantize into are copied; when
   * it reaches new pages, the old tail slot and every new slot but the last get quantized page ids
   * (filled as each layer writes past them) and the last new slot is the tail (allocated if none).
   */
  private growQuantized(g: Growth): void {
    const s = g.seq;
    const P = this.pageSize;
    const [from, to] = this.quantizedWriteRange(g);
    for (let i = from; i < to; i++) {
      const page = s.pages[i]!;
      if (this.#allocator.refCount(page) <= 1) continue;
      s.pages[i] = this.copyQuantizedPage(page);
      s.rewrites++;
    }
    const pagesAfter = Math.ceil(g.newLength / P);
    if (pagesAfter > s.count) {
      ensureCapacity(this.#arena, s, pagesAfter);
      // The tail's slot gets the quantized page its tail will be quantized into.
      if (s.tail >= 0) s.rewrites++;
      for (let i = quantizedSlots(s); i < pagesAfter - 1; i++) s.pages[i] = this.#allocator.allocate();
      if (s.tail < 0) s.tail = this.#tails!.allocate();
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
  private copyQuantizedPage(page: number): number {
    const copy = this.#allocator.allocate();
    for (const { quant } of this.#quantLayers) {
      for (const t of [quant.kCodes, quant.vCodes, quant.kScale, quant.kMin, quant.vScale, quant.vMin]) if (t) copyRows(t, page, copy);
    }
    this.#allocator.release(page);
    return copy;
  }

  /**
   * @internal Writes k, v rows of `items` into `layer` of a quantized cache, whose slots reserve() made.
   * Each item's rows fill its tail page from the layer's first unquantized page on; every page the
   * write passes is quantized into its slot's page id. When no item passes more than a full tail
   * (decode and short chunks) that is one quantizePages call for the full tails and one append into
   * the tail pool (`staged` keeps that append's table for the other layers of a step); otherwise the
   * pages go through a scratch pool of the pages written.
   */
  writeQuantized(layer: number, k: Tensor, v: Tensor, items: readonly WriteItem[], staged?: { table?: StagedPageTable }): void {
    const P = this.pageSize;
    const { quant, tail } = this.#quantLayers[layer]!;
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
      if (sealSrc.length > 0) quantizePages({ kSrc: tail.kTail, vSrc: tail.vTail, srcPages: Int32Array.from(sealSrc), dstPages: Int32Array.from(sealDst) }, quant);
      let table: PageTable | StagedPageTable = { indptr, indices: Int32Array.from(items, (it) => it.seq.tail), lastPageLen };
      if (staged) table = staged.table ??= new StagedPageTable(table, this.device as DeviceName);
      appendPagedKV(k, v, { kPages: tail.kTail, vPages: tail.vTail }, table, { batchIndices, positions });
    } else {
      const scratchShape = [indptr[batch]!, P, this.kvHeads, this.headDim];
      using kScratch = Tensor.empty(scratchShape, { dtype: this.dtype, device: this.device as DeviceName });
      using vScratch = Tensor.empty(scratchShape, { dtype: this.dtype, device: this.device as DeviceName });
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
      if (src.length > 0) quantizePages({ kSrc: kScratch, vSrc: vScratch, srcPages: Int32Array.from(src), dstPages: Int32Array.from(dst) }, quant);
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
   * truncate() on a quantized cache: within the tail page the tail is simply cut; before it only to a
   * page boundary that every layer has quantized (a quantized page cannot be cut), dropping the tail.
   */
  private truncateQuantized(state: Sequence, seq: number, length: number): void {
    const P = this.pageSize;
    const quantized = quantizedSlots(state);
    const keep = Math.ceil(length / P);
    if (state.tail < 0 || length <= quantized * P) {
      if (length % P !== 0) {
        const within = state.tail < 0 ? '' : `above ${quantized * P} (within its tail page) or `;
        throw errorAtCaller('E_UNSUPPORTED', `Expected a length for truncate of sequence ${seq} ${within}at a page boundary (a multiple of ${P}) but received ${length}: a quantized page cannot be cut`);
      }
      for (let l = 0; l < this.layers; l++) {
        if (state.written[l]! < length || state.quantized[l]! < keep) {
          throw errorAtCaller('E_UNSUPPORTED', `Expected every layer of sequence ${seq} to have written and quantized its first ${keep} page(s) for truncate to ${length} but layer ${l} has written ${state.written[l]} tokens and quantized ${state.quantized[l]} page(s) (write that layer on first)`);
        }
      }
      for (let i = keep; i < quantized; i++) this.#allocator.release(state.pages[i]!);
      if (state.tail >= 0) this.#tails!.release(state.tail);
      state.tail = -1;
      state.quantized.fill(keep);
    }
    state.mass.fill(0, keep, state.count);
    state.count = keep;
    state.rewrites++;
    state.length = length;
    state.end = keep === 0 ? 0 : state.starts[keep - 1]! + length - (keep - 1) * P;
    for (let l = 0; l < this.layers; l++) state.written[l] = Math.min(state.written[l]!, length);
    if (state.prompt) state.prompt = state.prompt.subarray(0, Math.min(state.prompt.length, length));
    state.published = Math.min(state.published, Math.floor(length / P));
    this.#version++;
  }

  /** The E_OOM for `requested` tail pages, with the stats. */
  private outOfTails(requested: number): KvflashError {
    const stats = this.stats();
    const error = errorAtCaller('E_OOM', `Expected ${requested} free tail page(s) but ${this.#tails!.freeCount} of maxSequences = ${this.maxSequences} are free (every sequence holding tokens has one; raise maxSequences) (${JSON.stringify(stats)})`);
    return Object.assign(error, { stats });
  }

  private quantLayer(layer: number, name: string): QuantLayer {
    this.checkLive();
    this.checkLayer(layer);
    if (!this.quant) throw errorAtCaller('E_UNSUPPORTED', `Expected a PagedKVCache made with quant for ${name}(layer) but this one holds full-precision pages: use pages(layer)`);
    return this.#quantLayers[layer]!;
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
    for (const { quant, tail } of this.#quantLayers) {
      if (quant) disposeQuantizedPages(quant);
      tail.kTail?.dispose();
      tail.vTail?.dispose();
    }
    this.#pools = [];
    this.#questMeta = [];
    this.#quantLayers = [];
  }
}

/** Copies row `from` of `source` (default `t` itself) into row `to` of `t` (dim 0: pages). */
function copyRows(t: Tensor, from: number, to: number, source: Tensor = t): void {
  using dst = t.slice(to, to + 1);
  using src = source.slice(from, from + 1);
  dst.copyFrom(src);
}

