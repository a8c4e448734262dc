// PagedKVCache with quantized pages: decode over the cache equals the quantized decode over pages
// quantized directly from the same keys and values (bit for bit on the CPU) and stays close to a
// full-precision cache; appending token by token gives the bytes of quantizing a page at once; forks
// share quantized pages and copy tails; prefix reuse, eviction, truncation, freeing and running out
// of tail pages keep every page, tail and reference count exact.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';

import { CacheStep, EvictionPolicy, PagedKVCache, PagedKVCacheOptions, StreamingLLM } from '../../lib/cache/index';
import { KvflashError, ops, Tensor } from '../../lib/index';
import type { PageTable, QuantFormat, QuantizedKVPages, TailPages } from '../../lib/index';
import { normal, rng } from '../attention-fixtures';
import { FORMATS } from '../quant-fixtures';
import { codeOf, expectedTable, keptTable } from './fixtures';

const KEY = 0;
const VALUE = 1;
const HEADS = 4;

/** The keys or values of one token at one position on one layer: seeded gaussian rows [kvHeads * headDim]. */
function tokenRow(token: number, position: number, layer: number, which: number, row: number): Float32Array {
  return normal(row, rng((((token * 4099 + position) * 8 + layer) * 2 + which) * 7919 + 13));
}

function tokenRows(cache: PagedKVCache, tokens: readonly number[], start: number, layer: number, which: number): Float32Array {
  const row = cache.kvHeads * cache.headDim;
  const out = new Float32Array(tokens.length * row);
  tokens.forEach((t, i) => out.set(tokenRow(t, start + i, layer, which, row), i * row));
  return out;
}

/** Appends `tokens` to every layer of `seq` with the single-sequence append (the first position is the sequence's next). */
function appendTokens(cache: PagedKVCache, seq: number, tokens: readonly number[]): void {
  const start = cache.info(seq).nextPosition;
  const shape = [tokens.length, cache.kvHeads, cache.headDim];
  for (let layer = 0; layer < cache.layers; layer++) {
    using k = Tensor.fromArray(tokenRows(cache, tokens, start, layer, KEY), shape, { dtype: cache.dtype });
    using v = Tensor.fromArray(tokenRows(cache, tokens, start, layer, VALUE), shape, { dtype: cache.dtype });
    cache.append(seq, layer, k, v);
  }
}

type Batch = { seq: number; tokens: number[] }[];

/** The keys or values of a step's new tokens on `layer`: [rows, kvHeads, headDim] in the step's row order. */
function stepRows(cache: PagedKVCache, step: CacheStep, batch: Batch, layer: number, which: number): Tensor {
  const parts = batch.map(({ tokens }, b) => tokenRows(cache, tokens, step.positions[step.cuSeqlensQ[b]!]!, layer, which));
  const out = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) out.set(p, (at += p.length) - p.length);
  return Tensor.fromArray(out, [step.slots.length, cache.kvHeads, cache.headDim], { dtype: cache.dtype });
}

/** Appends to every layer of several sequences at once through beginStep. */
function appendStep(cache: PagedKVCache, batch: Batch): void {
  using step = cache.beginStep(batch.map(({ seq, tokens }) => ({ seq, tokens: tokens.length })));
  for (let layer = 0; layer < cache.layers; layer++) {
    using k = stepRows(cache, step, batch, layer, KEY);
    using v = stepRows(cache, step, batch, layer, VALUE);
    step.append(layer, k, v);
  }
}

/** Token id at every absolute position a sequence ever held. */
type History = Map<number, number[]>;

type Attend = (quant: QuantizedKVPages, tail: TailPages, table: PageTable) => Tensor;

/**
 * The attention `attend` runs over `seqIds` done from scratch: each sequence's pages (by its pageStarts)
 * rebuilt from the token history, its full pages quantized with ops.quantizePages into a fresh pool,
 * its last page in a fresh tail pool, and `attend` over them (its output's bytes).
 */
async function referenceAttention(cache: PagedKVCache, history: History, seqIds: number[], layer: number, attend: Attend): Promise<Uint8Array> {
  const { pageSize: P, kvHeads, headDim } = cache;
  const row = kvHeads * headDim;
  const pageRows = P * row;
  const infos = seqIds.map((s) => cache.info(s));
  const full = infos.reduce((n, i) => n + i.pages.length - 1, 0);
  const kFull = new Float32Array(Math.max(1, full) * pageRows), vFull = new Float32Array(Math.max(1, full) * pageRows);
  const kTail = new Float32Array(seqIds.length * pageRows), vTail = new Float32Array(seqIds.length * pageRows);
  const indptr = [0], indices: number[] = [], lastPageLen: number[] = [];
  let next = 0;
  infos.forEach((info, b) => {
    const tokens = history.get(seqIds[b]!)!;
    const count = info.pages.length;
    for (let i = 0; i < count; i++) {
      const tail = i === count - 1;
      const len = tail ? info.length - (count - 1) * P : P;
      const page = tail ? b : next++;
      for (let t = 0; t < len; t++) {
        const position = info.pageStarts[i]! + t;
        const at = (page * P + t) * row;
        (tail ? kTail : kFull).set(tokenRow(tokens[position]!, position, layer, KEY, row), at);
        (tail ? vTail : vFull).set(tokenRow(tokens[position]!, position, layer, VALUE, row), at);
      }
      indices.push(page);
      if (tail) lastPageLen.push(len);
    }
    indptr.push(indices.length);
  });
  const opts = { dtype: cache.dtype } as const;
  const shape = (n: number) => [n, P, kvHeads, headDim];
  using kSrc = Tensor.fromArray(kFull, shape(Math.max(1, full)), opts);
  using vSrc = Tensor.fromArray(vFull, shape(Math.max(1, full)), opts);
  using kT = Tensor.fromArray(kTail, shape(seqIds.length), opts);
  using vT = Tensor.fromArray(vTail, shape(seqIds.length), opts);
  const quant = ops.createQuantizedPages(Math.max(1, full), P, kvHeads, headDim, { ...cache.quant! });
  try {
    const all = Int32Array.from({ length: full }, (_, i) => i);
    ops.quantizePages({ kSrc, vSrc, srcPages: all, dstPages: all }, quant);
    using out = attend(quant, { kTail: kT, vTail: vT }, { indptr, indices, lastPageLen });
    return await out.bytes();
  } finally {
    ops.disposeQuantizedPages(quant);
  }
}

/** referenceAttention of the quantized decode of q. */
function referenceDecode(cache: PagedKVCache, history: History, seqIds: number[], layer: number, q: Tensor): Promise<Uint8Array> {
  return referenceAttention(cache, history, seqIds, layer, (quant, tail, table) => ops.quantizedPagedDecodeAttention(q, quant, tail, table).out);
}

async function cacheDecode(cache: PagedKVCache, seqIds: number[], layer: number, q: Tensor): Promise<Uint8Array> {
  using table = cache.stagePageTable(seqIds);
  const { out } = ops.quantizedPagedDecodeAttention(q, cache.quantizedPages(layer), cache.tailPages(layer), table);
  using _out = out;
  return out.bytes();
}

function query(cache: PagedKVCache, batch: number, seed: number): Tensor {
  return Tensor.fromArray(normal(batch * HEADS * cache.headDim, rng(seed)), [batch, HEADS, cache.headDim], { dtype: cache.dtype });
}

/** Every tensor of quantized page `page` of `layer`, as bytes. */
async function quantizedPageBytes(quant: QuantizedKVPages, page: number): Promise<Uint8Array[]> {
  const out: Uint8Array[] = [];
  for (const t of [quant.kCodes, quant.vCodes, quant.kScale, quant.kMin, quant.vScale, quant.vMin]) {
    if (!t) continue;
    using row = t.slice(page, page + 1);
    out.push(await row.bytes());
  }
  return out;
}

/** Everything observable about a quantized cache, to show that a refused call changed nothing. */
async function snapshot(cache: PagedKVCache) {
  const sequences = cache.sequences().map((seq) => cache.info(seq));
  const layers = [];
  for (let layer = 0; layer < cache.layers; layer++) {
    const { quant, tail } = { quant: cache.quantizedPages(layer), tail: cache.tailPages(layer) };
    const tensors = [quant.kCodes, quant.vCodes, quant.kScale, quant.kMin, quant.vScale, quant.vMin, tail.kTail, tail.vTail];
    layers.push(await Promise.all(tensors.filter((t) => t !== undefined).map((t) => t!.bytes())));
  }
  return { stats: cache.stats(), sequences, layers };
}

const range = (from: number, to: number) => Array.from({ length: to - from }, (_, i) => from + i);

function quantCache(format: QuantFormat, overrides: Partial<PagedKVCacheOptions> = {}): PagedKVCache {
  return new PagedKVCache({ layers: 2, numPages: 24, pageSize: 4, kvHeads: 2, headDim: 32, dtype: 'f32', quant: { format }, maxSequences: 8, ...overrides });
}

/** ||a - b|| / ||b|| over f32 bytes. */
function relativeError(a: Uint8Array, b: Uint8Array): number {
  const x = new Float32Array(a.buffer, a.byteOffset, a.length / 4), y = new Float32Array(b.buffer, b.byteOffset, b.length / 4);
  let num = 0, den = 0;
  for (let i = 0; i < x.length; i++) {
    num += (x[i]! - y[i]!) ** 2;
    den += y[i]! ** 2;
  }
  return Math.sqrt(num / den);
}

// Relative L2 error of the attention output against full precision (bench/results/quant-accuracy.md, with margin).
const EXPECTED_ERROR: Record<QuantFormat, number> = { fp8e4m3: 0.08, int8: 0.015, int4: 0.25, int2: 1.0 };

describe('PagedKVCache with quantized pages', () => {
  for (const format of FORMATS) {
    it(`${format}: decode over the cache equals decode over pages quantized from the same data, and is close to full precision`, async () => {
      using cache = quantCache(format);
      using plain = new PagedKVCache({ layers: 2, numPages: 24, pageSize: 4, kvHeads: 2, headDim: 32, dtype: 'f32' });
      const history: History = new Map();
      const lengths = [1, 4, 5, 11];
      const seqs = lengths.map(() => cache.addSequence());
      const plainSeqs = lengths.map(() => plain.addSequence());
      // A prompt chunk (passing several pages at once), then tokens one step at a time (full tails quantized as the next token comes).
      seqs.forEach((seq, b) => {
        const prompt = range(100 * b, 100 * b + Math.max(1, lengths[b]! - 3));
        appendTokens(cache, seq, prompt);
        appendTokens(plain, plainSeqs[b]!, prompt);
        history.set(seq, prompt);
      });
      for (let t = 0; t < 3; t++) {
        const batch = seqs.map((seq, b) => ({ seq, b })).filter(({ seq, b }) => history.get(seq)!.length < lengths[b]!);
        appendStep(cache, batch.map(({ seq }) => ({ seq, tokens: [50 + t] })));
        appendStep(plain, batch.map(({ b }) => ({ seq: plainSeqs[b]!, tokens: [50 + t] })));
        for (const { seq } of batch) history.get(seq)!.push(50 + t);
      }
      expect(seqs.map((s) => cache.info(s).length)).toEqual(lengths);
      expect(cache.stats()).toMatchObject({ used: 1 + 2 + 0 + 0, tails: { used: 4 } }); // quantized: 5 -> 1 page, 11 -> 2; 1 and 4 are tails only
      for (let layer = 0; layer < cache.layers; layer++) {
        using q = query(cache, seqs.length, 7 + layer);
        const got = await cacheDecode(cache, seqs, layer, q);
        expect(got).toEqual(await referenceDecode(cache, history, seqs, layer, q));
        using table = plain.stagePageTable(plainSeqs);
        const { out } = ops.pagedDecodeAttention(q, plain.pages(layer), table);
        using _out = out;
        const error = relativeError(got, await out.bytes());
        expect(error).toBeLessThan(EXPECTED_ERROR[format]);
        if (format === 'int8') expect(error).toBeGreaterThan(0); // the pages are quantized, not copied
      }
      // step.table is the same table, ready for the quantized decode.
      using step = cache.beginStep(seqs.map((seq) => ({ seq, tokens: 1 })));
      expect(await step.table.toArrays()).toEqual(cache.pageTable(seqs));
      const table = cache.pageTable(seqs);
      seqs.forEach((seq, b) => expect(table.indices[table.indptr[b + 1]! - 1]).toBe(cache.info(seq).tail));
    });
  }

  for (const format of FORMATS) {
    it(`${format}: chunked prefill through beginStep attends to the quantized prefix and the tail, and is close to full precision`, async () => {
      using cache = quantCache(format);
      using plain = new PagedKVCache({ layers: 2, numPages: 24, pageSize: 4, kvHeads: 2, headDim: 32, dtype: 'f32' });
      const history: History = new Map();
      const seqs = [cache.addSequence(), cache.addSequence(), cache.addSequence()];
      const plainSeqs = seqs.map(() => plain.addSequence());
      seqs.forEach((seq) => history.set(seq, []));
      // Chunks within a page, across several pages, ending on a page boundary (a full tail), one token.
      const chunks = [[7, 3, 4], [6, 9, 1], [1, 4, 3], [9, 2, 8]];
      let token = 1;
      for (const [c, sizes] of chunks.entries()) {
        const batch = seqs.map((seq, b) => ({ seq, tokens: range(token, (token += sizes[b]!)) }));
        const plainBatch = batch.map(({ tokens }, b) => ({ seq: plainSeqs[b]!, tokens }));
        for (const { seq, tokens } of batch) history.get(seq)!.push(...tokens);
        using step = cache.beginStep(batch.map(({ seq, tokens }) => ({ seq, tokens: tokens.length })));
        using plainStep = plain.beginStep(plainBatch.map(({ seq, tokens }) => ({ seq, tokens: tokens.length })));
        for (let layer = 0; layer < cache.layers; layer++) {
          for (const [s, b] of [[step, batch], [plainStep, plainBatch]] as const) {
            using k = stepRows(cache, s, b, layer, KEY);
            using v = stepRows(cache, s, b, layer, VALUE);
            s.append(layer, k, v);
          }
          using q = query(cache, step.slots.length, 100 * c + layer);
          const opts = { cuSeqlensQ: step.cuSeqlensQ, returnLse: true };
          const { out, lse } = ops.quantizedPagedPrefillAttention(q, step.quantizedPages(layer), step.tailPages(layer), step.table, opts);
          using _lse = lse;
          using _out = out;
          const got = await out.bytes();
          expect(got).toEqual(await referenceAttention(cache, history, seqs, layer, (quant, tail, table) => ops.quantizedPagedPrefillAttention(q, quant, tail, table, opts).out));
          const full = ops.pagedPrefillAttention(q, plainStep.pages(layer), plainStep.table, opts);
          using _full = full.out;
          using _fullLse = full.lse;
          expect(relativeError(got, await full.out.bytes())).toBeLessThan(EXPECTED_ERROR[format]);
        }
      }
      expect(seqs.map((s) => cache.info(s).length)).toEqual([23, 18, 16]);
    });
  }

  for (const format of FORMATS) {
    it(`${format}: appending token by token gives the bytes of quantizing each page at once (bf16, one append of many pages too)`, async () => {
      using cache = quantCache(format, { dtype: 'bf16', layers: 1 });
      const tokens = range(1, 4 * 3 + 3);
      const byToken = cache.addSequence();
      for (const t of tokens) appendTokens(cache, byToken, [t]);
      const atOnce = cache.addSequence();
      appendTokens(cache, atOnce, tokens);
      const P = cache.pageSize, row = cache.kvHeads * cache.headDim;
      using kSrc = Tensor.fromArray(tokenRows(cache, tokens.slice(0, 3 * P), 0, 0, KEY), [3, P, cache.kvHeads, cache.headDim], { dtype: 'bf16' });
      using vSrc = Tensor.fromArray(tokenRows(cache, tokens.slice(0, 3 * P), 0, 0, VALUE), [3, P, cache.kvHeads, cache.headDim], { dtype: 'bf16' });
      const whole = ops.createQuantizedPages(3, P, cache.kvHeads, cache.headDim, { format });
      ops.quantizePages({ kSrc, vSrc, srcPages: [0, 1, 2], dstPages: [0, 1, 2] }, whole);
      for (const seq of [byToken, atOnce]) {
        const { pages, tail } = cache.info(seq);
        expect(pages).toHaveLength(4);
        expect(pages[3]).toBe(tail);
        for (let i = 0; i < 3; i++) expect(await quantizedPageBytes(cache.quantizedPages(0), pages[i]!)).toEqual(await quantizedPageBytes(whole, i));
        // The tail holds the last two tokens in full precision.
        using kTail = cache.tailPages(0).kTail.slice(tail!, tail! + 1);
        const held = (await kTail.toArray()) as Float32Array;
        using expected = Tensor.fromArray(tokenRows(cache, tokens.slice(3 * P), 3 * P, 0, KEY), [2, cache.kvHeads, cache.headDim], { dtype: 'bf16' });
        expect(held.subarray(0, 2 * row)).toEqual(await expected.toArray());
      }
      ops.disposeQuantizedPages(whole);
    });
  }

  it('forks by sharing quantized pages and copying the tail; the two then diverge', async () => {
    using cache = quantCache('int4');
    const history: History = new Map();
    const parent = cache.addSequence();
    appendTokens(cache, parent, range(1, 7)); // one quantized page, a tail holding 2 of 4
    history.set(parent, range(1, 7));
    const child = cache.fork(parent);
    history.set(child, range(1, 7));
    const [p, c] = [cache.info(parent), cache.info(child)];
    expect(c.pages[0]).toBe(p.pages[0]);
    expect(c.tail).not.toBe(p.tail);
    expect(cache.refCount(p.pages[0]!)).toBe(2);
    expect(cache.stats()).toMatchObject({ used: 1, shared: 1, tails: { used: 2 } });
    // Both write past their tails: each quantizes its own second page; the shared first page is never copied.
    appendTokens(cache, child, [50, 51, 52]);
    appendTokens(cache, parent, [60, 61, 62, 63]);
    history.get(child)!.push(50, 51, 52);
    history.get(parent)!.push(60, 61, 62, 63);
    const [p2, c2] = [cache.info(parent), cache.info(child)];
    expect(c2.pages[0]).toBe(p2.pages[0]);
    expect(c2.pages[1]).not.toBe(p2.pages[1]);
    expect(cache.stats()).toMatchObject({ used: 3, shared: 1, tails: { used: 2 } });
    for (let layer = 0; layer < cache.layers; layer++) {
      using q = query(cache, 2, 3);
      expect(await cacheDecode(cache, [parent, child], layer, q)).toEqual(await referenceDecode(cache, history, [parent, child], layer, q));
    }
    cache.free(parent);
    expect(cache.refCount(p2.pages[0]!)).toBe(1);
    cache.free(child);
    expect(cache.stats()).toMatchObject({ used: 0, shared: 0, tails: { used: 0 } });
  });

  it('copies a shared quantized page before a layer that was behind quantizes into it (fork with a layer behind)', async () => {
    using cache = quantCache('int8');
    const history: History = new Map();
    const seq = cache.addSequence();
    // Layer 0 runs 6 tokens ahead: it has quantized page 0, layer 1 still holds tokens 0-1 in its tail.
    const tokens = range(1, 9);
    const shape = (n: number) => [n, cache.kvHeads, cache.headDim];
    {
      using k = Tensor.fromArray(tokenRows(cache, tokens, 0, 0, KEY), shape(8));
      using v = Tensor.fromArray(tokenRows(cache, tokens, 0, 0, VALUE), shape(8));
      cache.append(seq, 0, k, v);
      using k1 = Tensor.fromArray(tokenRows(cache, tokens.slice(0, 2), 0, 1, KEY), shape(2));
      using v1 = Tensor.fromArray(tokenRows(cache, tokens.slice(0, 2), 0, 1, VALUE), shape(2));
      cache.append(seq, 1, k1, v1);
    }
    const fork = cache.fork(seq);
    const shared = cache.info(seq).pages[0]!;
    expect(cache.refCount(shared)).toBe(2);
    keptTable(cache, [seq, fork]); // the copy below replaces a page id in a row the kept buffers hold
    for (const s of [seq, fork]) {
      using k1 = Tensor.fromArray(tokenRows(cache, tokens.slice(2), 2, 1, KEY), shape(6));
      using v1 = Tensor.fromArray(tokenRows(cache, tokens.slice(2), 2, 1, VALUE), shape(6));
      cache.append(s, 1, k1, v1);
      history.set(s, tokens);
    }
    expect(cache.info(seq).pages[0]).not.toBe(cache.info(fork).pages[0]);
    expect(cache.refCount(shared)).toBe(1);
    expect(keptTable(cache, [seq, fork])).toEqual(expectedTable(cache, [seq, fork]));
    for (let layer = 0; layer < cache.layers; layer++) {
      using q = query(cache, 2, 5);
      expect(await cacheDecode(cache, [seq, fork], layer, q)).toEqual(await referenceDecode(cache, history, [seq, fork], layer, q));
    }
  });

  it('reuses quantized prompt pages from the prefix cache; the sequence starts a tail with its next token', async () => {
    using cache = quantCache('int4', { prefixCache: true });
    const prompt = range(1, 10); // 9 tokens: two full pages are quantized once token 9 is in
    const a = cache.addSequence({ prompt });
    appendTokens(cache, a, prompt);
    expect(cache.stats().prefix).toMatchObject({ pages: 2 });
    const b = cache.addSequence({ prompt });
    expect(cache.info(b)).toMatchObject({ length: 8, tail: -1, pages: cache.info(a).pages.slice(0, 2) });
    expect(codeOf(() => cache.pageTable([b]))).toBe('E_RANGE'); // no tail to decode from until a token is appended
    appendTokens(cache, b, [9]);
    const history: History = new Map([[a, prompt], [b, prompt]]);
    using q1 = query(cache, 1, 11);
    using q = Tensor.fromArray([...((await q1.toArray()) as Float32Array), ...((await q1.toArray()) as Float32Array)], [2, HEADS, cache.headDim]);
    const got = await cacheDecode(cache, [a, b], 1, q);
    expect(got).toEqual(await referenceDecode(cache, history, [a, b], 1, q));
    expect(got.subarray(0, got.length / 2)).toEqual(got.subarray(got.length / 2));
    expect(cache.stats()).toMatchObject({ used: 2, tails: { used: 2 } });
  });

  it('evicts only quantized pages under StreamingLLM, never the tail, and decodes what is kept', async () => {
    using cache = quantCache('fp8e4m3', { numPages: 3, policy: new StreamingLLM({ sinkPages: 1, windowPages: 2 }) });
    const seq = cache.addSequence();
    const history: History = new Map([[seq, []]]);
    for (let t = 0; t < 30; t++) {
      appendStep(cache, [{ seq, tokens: [t + 1] }]);
      history.get(seq)!.push(t + 1);
      const info = cache.info(seq);
      expect(info.pages.at(-1)).toBe(info.tail);
      expect(info.pageStarts[info.pageStarts.length - 1]).toBe(Math.floor(t / 4) * 4);
    }
    expect(cache.stats().evictedPages).toBeGreaterThan(0);
    expect(cache.info(seq).pageStarts[0]).toBe(0); // the sink
    using q = query(cache, 1, 2);
    expect(await cacheDecode(cache, [seq], 0, q)).toEqual(await referenceDecode(cache, history, [seq], 0, q));
  });

  it('truncates within the tail or to a quantized page boundary, and refuses to cut a quantized page', async () => {
    using cache = quantCache('int2');
    const seq = cache.addSequence();
    appendTokens(cache, seq, range(1, 11)); // pages: 2 quantized, tail of 2
    const fork = cache.fork(seq);
    keptTable(cache, [seq, fork]); // the truncations and the append below bring seq back to 3 pages, other ones
    const before = await snapshot(cache);
    expect(codeOf(() => cache.truncate(seq, 6))).toBe('E_UNSUPPORTED');
    expect(await snapshot(cache)).toEqual(before);
    cache.truncate(seq, 9); // within the tail
    expect(cache.info(seq)).toMatchObject({ length: 9, tail: cache.info(seq).pages[2] });
    cache.truncate(seq, 4); // a boundary: the tail and the second page go
    expect(cache.info(seq)).toMatchObject({ length: 4, nextPosition: 4, tail: -1, written: Int32Array.from([4, 4]) });
    expect(cache.stats()).toMatchObject({ used: 2, shared: 1, tails: { used: 1 } });
    appendTokens(cache, seq, [70, 71, 72, 73, 74]);
    expect(keptTable(cache, [seq, fork])).toEqual(expectedTable(cache, [seq, fork]));
    const history: History = new Map([
      [seq, [1, 2, 3, 4, 70, 71, 72, 73, 74]],
      [fork, range(1, 11)],
    ]);
    using q = query(cache, 2, 9);
    expect(await cacheDecode(cache, [seq, fork], 0, q)).toEqual(await referenceDecode(cache, history, [seq, fork], 0, q));
    cache.truncate(seq, 0);
    expect(cache.info(seq)).toMatchObject({ length: 0, tail: -1, pages: new Int32Array(0) });
    // A layer behind still holds page 1 in its tail: a cut at the end of page 1 would lose it.
    const behind = cache.addSequence();
    using k = Tensor.fromArray(tokenRows(cache, range(1, 11), 0, 0, KEY), [10, 2, 32]);
    using v = Tensor.fromArray(tokenRows(cache, range(1, 11), 0, 0, VALUE), [10, 2, 32]);
    cache.append(behind, 0, k, v);
    using k1 = k.slice(0, 8), v1 = v.slice(0, 8);
    cache.append(behind, 1, k1, v1);
    const beforeCut = await snapshot(cache);
    expect(() => cache.truncate(behind, 8)).toThrow(expect.objectContaining({ code: 'E_UNSUPPORTED', message: expect.stringContaining('layer 1 has written 8 tokens and quantized 1 page(s)') }));
    expect(await snapshot(cache)).toEqual(beforeCut);
    cache.truncate(behind, 4);
    expect(cache.info(behind)).toMatchObject({ length: 4, tail: -1, written: Int32Array.from([4, 4]) });
  });

  it('runs out of tail pages with E_OOM naming maxSequences, changing nothing', async () => {
    using cache = quantCache('int8', { maxSequences: 2 });
    const a = cache.addSequence(), b = cache.addSequence();
    appendTokens(cache, a, [1, 2, 3, 4, 5]);
    appendTokens(cache, b, [6]);
    const c = cache.addSequence(); // no tail until it holds a token
    const before = await snapshot(cache);
    for (const call of [
      () => appendTokens(cache, c, [7]),
      () => cache.fork(a),
      () => cache.beginStep([{ seq: a, tokens: 4 }, { seq: c, tokens: 1 }]),
    ]) {
      let error: (KvflashError & { stats?: unknown }) | undefined;
      try {
        call();
      } catch (e) {
        error = e as KvflashError;
      }
      expect(error?.code).toBe('E_OOM');
      expect(error?.message).toContain('maxSequences = 2');
      expect(error?.stats).toMatchObject({ tails: { capacity: 2, used: 2, free: 0 }, sequences: 3 });
      expect(await snapshot(cache)).toEqual(before);
    }
    cache.free(b);
    appendTokens(cache, c, [7]);
    expect(cache.stats()).toMatchObject({ tails: { used: 2 } });
  });

  it('runs out of quantized pages with E_OOM (the tails do not count), changing nothing', async () => {
    using cache = quantCache('int4', { numPages: 2 });
    const a = cache.addSequence();
    appendTokens(cache, a, range(1, 12)); // 2 quantized pages and a tail
    const before = await snapshot(cache);
    expect(codeOf(() => appendStep(cache, [{ seq: a, tokens: [1, 2] }]))).toBe('E_OOM');
    expect(await snapshot(cache)).toEqual(before);
    appendStep(cache, [{ seq: a, tokens: [12] }]); // still fits the tail
    expect(cache.info(a).length).toBe(12);
  });

  it('refuses pages(layer) and bad quant options; frees every pool (and the Quest metadata) on dispose', () => {
    const base = { layers: 1, numPages: 4, pageSize: 4, kvHeads: 1, headDim: 32, dtype: 'f32' } as const;
    expect(codeOf(() => new PagedKVCache({ ...base, quant: { format: 'int3' as QuantFormat } }))).toBe('E_RANGE');
    expect(codeOf(() => new PagedKVCache({ ...base, quant: { format: 'int4', groupSize: 48 } }))).toBe('E_RANGE');
    expect(codeOf(() => new PagedKVCache({ ...base, quant: { format: 'int4', groupSize: 64 } }))).toBe('E_SHAPE');
    expect(codeOf(() => new PagedKVCache({ ...base, dtype: 'i8', quant: { format: 'int8' } }))).toBe('E_DTYPE');
    expect(codeOf(() => new PagedKVCache({ ...base, quant: { format: 'int8' }, maxSequences: 0 }))).toBe('E_RANGE');
    using plain = new PagedKVCache(base);
    expect(codeOf(() => plain.quantizedPages(0))).toBe('E_UNSUPPORTED');
    const cache = new PagedKVCache({ ...base, quant: { format: 'int8' }, quest: true });
    expect(() => cache.pages(0)).toThrow(expect.objectContaining({ code: 'E_UNSUPPORTED', message: expect.stringContaining('quantizedPages(layer)') }));
    expect(cache.maxSequences).toBe(64);
    expect(cache.tailPages(0).kTail.shape).toEqual([64, 4, 1, 32]);
    expect(codeOf(() => cache.quantizedPages(1))).toBe('E_RANGE');
    const { kCodes, vMin } = cache.quantizedPages(0);
    const { kTail, vTail } = cache.tailPages(0);
    const meta = cache.questMeta(0);
    expect(meta.shape).toEqual([4, 2, 1, 32]);
    cache.dispose();
    expect([kCodes, vMin!, kTail, vTail, meta].every((t) => t.disposed)).toBe(true);
    expect(codeOf(() => cache.quantizedPages(0))).toBe('E_DISPOSED');
  });
});

type Command =
  | { op: 'add'; prompt: boolean }
  | { op: 'append'; pick: number; tokens: number; batchWith: number | null; single: boolean }
  | { op: 'fork'; pick: number }
  | { op: 'truncate'; pick: number; keep: number }
  | { op: 'free'; pick: number };

const command: fc.Arbitrary<Command> = fc.oneof(
  { weight: 1, arbitrary: fc.record({ op: fc.constant('add' as const), prompt: fc.boolean() }) },
  { weight: 6, arbitrary: fc.record({ op: fc.constant('append' as const), pick: fc.nat(), tokens: fc.integer({ min: 1, max: 7 }), batchWith: fc.option(fc.nat()), single: fc.boolean() }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('fork' as const), pick: fc.nat() }) },
  { weight: 2, arbitrary: fc.record({ op: fc.constant('truncate' as const), pick: fc.nat(), keep: fc.nat() }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('free' as const), pick: fc.nat() }) },
);

const PROMPT = range(1, 12);

async function checkInvariants(cache: PagedKVCache, history: History): Promise<void> {
  const owners = new Int32Array(cache.numPages);
  for (const page of cache.prefix?.cachedPages() ?? []) owners[page]!++;
  const tails = new Set<number>();
  const decodable: number[] = [];
  for (const [seq, tokens] of history) {
    const info = cache.info(seq);
    expect(info.nextPosition).toBe(tokens.length);
    expect(info.written).toEqual(Int32Array.from([info.length, info.length]));
    expect(info.pages.length).toBe(Math.ceil(info.length / cache.pageSize));
    const quantized = info.tail! >= 0 ? info.pages.length - 1 : info.pages.length;
    if (info.tail! >= 0) {
      expect(info.pages.at(-1)).toBe(info.tail);
      expect(tails.has(info.tail!)).toBe(false);
      tails.add(info.tail!);
      decodable.push(seq);
    } else {
      expect(info.length % cache.pageSize).toBe(0);
    }
    for (let i = 0; i < quantized; i++) owners[info.pages[i]!]!++;
  }
  for (let page = 0; page < cache.numPages; page++) expect(cache.refCount(page)).toBe(owners[page]);
  const used = owners.filter((o) => o > 0).length;
  expect(cache.stats()).toMatchObject({ used, shared: owners.filter((o) => o > 1).length, tails: { used: tails.size } });
  if (decodable.length === 0) return;
  expect(keptTable(cache, decodable)).toEqual(expectedTable(cache, decodable));
  for (let layer = 0; layer < cache.layers; layer++) {
    using q = query(cache, decodable.length, layer);
    expect(await cacheDecode(cache, decodable, layer, q)).toEqual(await referenceDecode(cache, history, decodable, layer, q));
  }
}

async function run(format: QuantFormat, commands: Command[], policy?: EvictionPolicy): Promise<void> {
  using cache = new PagedKVCache({ layers: 2, numPages: 7, pageSize: 2, kvHeads: 1, headDim: 32, dtype: 'f32', quant: { format }, maxSequences: 3, prefixCache: true, policy });
  const history: History = new Map();
  const pending = new Map<number, number[]>();
  let nextToken = 200;
  const pick = (n: number) => {
    const live = [...history.keys()];
    return live.length === 0 ? undefined : live[n % live.length]!;
  };
  const tokensFor = (seq: number, count: number) => {
    const fromPrompt = (pending.get(seq) ?? []).slice(0, count);
    return [...fromPrompt, ...Array.from({ length: count - fromPrompt.length }, () => nextToken++)];
  };
  for (const c of commands) {
    const seq = c.op === 'add' ? undefined : pick(c.pick);
    if (c.op !== 'add' && seq === undefined) continue;
    if (c.op === 'add') {
      const id = cache.addSequence(c.prompt ? { prompt: PROMPT } : {});
      const { length } = cache.info(id);
      history.set(id, c.prompt ? PROMPT.slice(0, length) : []);
      pending.set(id, c.prompt ? PROMPT.slice(length) : []);
    } else if (c.op === 'append') {
      const other = c.batchWith === null ? undefined : pick(c.batchWith);
      const batch = [{ seq: seq!, tokens: tokensFor(seq!, c.tokens) }];
      if (other !== undefined && other !== seq) batch.push({ seq: other, tokens: tokensFor(other, 1) });
      const before = await snapshot(cache);
      try {
        if (batch.length === 1 && c.single) appendTokens(cache, seq!, batch[0]!.tokens);
        else appendStep(cache, batch);
      } catch (error) {
        expect(error).toBeInstanceOf(KvflashError);
        expect((error as KvflashError).code).toBe('E_OOM');
        expect(await snapshot(cache)).toEqual(before);
        continue;
      }
      for (const { seq: s, tokens } of batch) {
        history.get(s)!.push(...tokens);
        pending.set(s, (pending.get(s) ?? []).slice(tokens.length));
      }
    } else if (c.op === 'fork') {
      try {
        const child = cache.fork(seq!);
        history.set(child, [...history.get(seq!)!]);
      } catch (error) {
        expect((error as KvflashError).code).toBe('E_OOM');
      }
    } else if (c.op === 'truncate') {
      const info = cache.info(seq!);
      const length = c.keep % (info.length + 1);
      const quantizedEnd = (info.tail! >= 0 ? info.pages.length - 1 : info.pages.length) * cache.pageSize;
      const allowed = (info.tail! >= 0 && length > quantizedEnd) || length % cache.pageSize === 0;
      const before = await snapshot(cache);
      if (!allowed) {
        expect(codeOf(() => cache.truncate(seq!, length))).toBe('E_UNSUPPORTED');
        expect(await snapshot(cache)).toEqual(before);
      } else {
        cache.truncate(seq!, length);
        history.set(seq!, history.get(seq!)!.slice(0, cache.info(seq!).nextPosition));
        pending.set(seq!, []);
      }
    } else {
      cache.free(seq!);
      history.delete(seq!);
      expect(codeOf(() => cache.free(seq!))).toBe('E_RANGE');
    }
    await checkInvariants(cache, history);
  }
  for (const seq of [...history.keys()]) cache.free(seq);
  expect(cache.stats()).toMatchObject({ used: cache.prefix!.stats().pages, tails: { used: 0 } });
}

describe('quantized PagedKVCache under random operations', () => {
  it('keeps quantized pages, tails, reference counts and every decode exact (prefix cache, forks, truncation, running out)', async () => {
    await fc.assert(
      fc.asyncProperty(fc.constantFrom(...FORMATS), fc.array(command, { minLength: 5, maxLength: 30, size: 'max' }), (format, commands) => run(format, commands)),
      { numRuns: 40 },
    );
  });

  it('keeps them exact while StreamingLLM drops quantized pages', async () => {
    await fc.assert(
      fc.asyncProperty(fc.constantFrom(...FORMATS), fc.array(command, { minLength: 5, maxLength: 30, size: 'max' }), (format, commands) =>
        run(format, commands, new StreamingLLM({ sinkPages: 1, windowPages: 2 })),
      ),
      { numRuns: 25 },
    );
  });
});
