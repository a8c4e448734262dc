// The CPU reference attention against an independent float64 definition, the variants against each
// other, and the checks that refuse bad input before any kernel runs.
import { describe, expect, it } from 'vitest';

import { KvflashError, ops, Tensor } from '../../lib/index';
import { maxAbsDiff, normal, offsets, pagedCache, referenceAttention, rng } from '../attention-fixtures';

const f32 = { dtype: 'f32' } as const;

describe('prefillAttention (CPU reference)', () => {
  const cases = [
    { name: 'causal chunks after a prefix, GQA 4', qLens: [1, 5, 13], kLens: [1, 9, 13], heads: 8, kvHeads: 2, causal: true, windowLeft: -1 },
    { name: 'sliding window', qLens: [6, 3], kLens: [17, 3], heads: 3, kvHeads: 3, causal: true, windowLeft: 4 },
    { name: 'not causal, MQA', qLens: [2, 7], kLens: [5, 1], heads: 4, kvHeads: 1, causal: false, windowLeft: -1 },
  ];
  for (const c of cases) {
    it(`matches the float64 definition: ${c.name}`, async () => {
      const random = rng(7);
      const dim = 12;
      const cuSeqlensQ = offsets(c.qLens), cuSeqlensK = offsets(c.kLens);
      const nq = cuSeqlensQ.at(-1)!, nk = cuSeqlensK.at(-1)!;
      const q = normal(nq * c.heads * dim, random), k = normal(nk * c.kvHeads * dim, random), v = normal(nk * c.kvHeads * dim, random);
      const scale = 0.3;
      using tq = Tensor.fromArray(q, [nq, c.heads, dim], f32);
      using tk = Tensor.fromArray(k, [nk, c.kvHeads, dim], f32);
      using tv = Tensor.fromArray(v, [nk, c.kvHeads, dim], f32);
      const { out, lse } = ops.prefillAttention(tq, tk, tv, { cuSeqlensQ, cuSeqlensK, causal: c.causal, windowLeft: c.windowLeft, scale, returnLse: true });
      using _o = out;
      using _l = lse!;
      const ref = referenceAttention({ q, k, v, cuSeqlensQ, cuSeqlensK, heads: c.heads, kvHeads: c.kvHeads, dim, causal: c.causal, windowLeft: c.windowLeft, scale });
      expect(maxAbsDiff(await out.toArray() as Float32Array, ref.out)).toBeLessThan(1e-5);
      expect(maxAbsDiff(await lse!.toArray() as Float32Array, ref.lse)).toBeLessThan(1e-5);
    });
  }

  it('uses 1/sqrt(D) by default and returns no lse unless asked', async () => {
    const random = rng(3);
    const q = normal(2 * 2 * 16, random), k = normal(3 * 2 * 16, random);
    using tq = Tensor.fromArray(q, [2, 2, 16]);
    using tk = Tensor.fromArray(k, [3, 2, 16]);
    const result = ops.prefillAttention(tq, tk, tk, { cuSeqlensQ: [0, 2], cuSeqlensK: [0, 3] });
    using _o = result.out;
    expect(result.lse).toBeUndefined();
    const ref = referenceAttention({ q, k, v: k, cuSeqlensQ: offsets([2]), cuSeqlensK: offsets([3]), heads: 2, kvHeads: 2, dim: 16, causal: true, windowLeft: -1, scale: 0.25 });
    expect(maxAbsDiff(await result.out.toArray() as Float32Array, ref.out)).toBeLessThan(1e-5);
  });
});

describe('paged attention (CPU reference)', () => {
  for (const dtype of ['f32', 'bf16'] as const) {
    it(`paged prefill equals ragged prefill on the same data (${dtype}, shuffled pages, partial last pages)`, async () => {
      const random = rng(11);
      const [heads, kvHeads, dim, pageSize] = [6, 2, 8, 4];
      const kLens = [1, 9, 16, 3], qLens = [1, 4, 16, 2];
      const cache = pagedCache(kLens, pageSize, kvHeads, dim, random);
      const cuSeqlensQ = offsets(qLens), cuSeqlensK = offsets(kLens);
      const nq = cuSeqlensQ.at(-1)!, nk = cuSeqlensK.at(-1)!;
      const opts = { dtype } as const;
      using q = Tensor.fromArray(normal(nq * heads * dim, random), [nq, heads, dim], opts);
      using k = Tensor.fromArray(cache.k, [nk, kvHeads, dim], opts);
      using v = Tensor.fromArray(cache.v, [nk, kvHeads, dim], opts);
      using kPages = Tensor.fromArray(cache.kPages, [cache.numPages, pageSize, kvHeads, dim], opts);
      using vPages = Tensor.fromArray(cache.vPages, [cache.numPages, pageSize, kvHeads, dim], opts);
      const ragged = ops.prefillAttention(q, k, v, { cuSeqlensQ, cuSeqlensK, returnLse: true });
      const paged = ops.pagedPrefillAttention(q, { kPages, vPages }, cache, { cuSeqlensQ, returnLse: true });
      expect([...(await paged.out.toArray())]).toEqual([...(await ragged.out.toArray())]);
      expect([...(await paged.lse!.toArray())]).toEqual([...(await ragged.lse!.toArray())]);
      for (const t of [ragged.out, ragged.lse!, paged.out, paged.lse!]) t.dispose();
    });
  }

  it('decode equals the last query row of paged prefill', async () => {
    const random = rng(5);
    const [heads, kvHeads, dim, pageSize] = [4, 4, 8, 2];
    const lens = [1, 2, 7];
    const cache = pagedCache(lens, pageSize, kvHeads, dim, random);
    const qData = normal(lens.length * heads * dim, random);
    using q = Tensor.fromArray(qData, [lens.length, heads, dim]);
    using kPages = Tensor.fromArray(cache.kPages, [cache.numPages, pageSize, kvHeads, dim]);
    using vPages = Tensor.fromArray(cache.vPages, [cache.numPages, pageSize, kvHeads, dim]);
    const decode = ops.pagedDecodeAttention(q, { kPages, vPages }, cache, { returnLse: true });
    const prefill = ops.pagedPrefillAttention(q, { kPages, vPages }, cache, { cuSeqlensQ: offsets([1, 1, 1]), returnLse: true });
    expect([...(await decode.out.toArray())]).toEqual([...(await prefill.out.toArray())]);
    expect([...(await decode.lse!.toArray())]).toEqual([...(await prefill.lse!.toArray())]);
    const ref = referenceAttention({ q: qData, k: cache.k, v: cache.v, cuSeqlensQ: offsets([1, 1, 1]), cuSeqlensK: offsets(lens), heads, kvHeads, dim, causal: true, windowLeft: -1, scale: 1 / Math.sqrt(dim) });
    expect(maxAbsDiff(await decode.out.toArray() as Float32Array, ref.out)).toBeLessThan(1e-5);
    for (const t of [decode.out, decode.lse!, prefill.out, prefill.lse!]) t.dispose();
  });

  it('reuses a staged page table across ops and refuses it once disposed', async () => {
    const random = rng(6);
    const [heads, kvHeads, dim, pageSize] = [2, 1, 8, 4];
    const cache = pagedCache([3, 10], pageSize, kvHeads, dim, random);
    using q = Tensor.fromArray(normal(2 * heads * dim, random), [2, heads, dim]);
    using kPages = Tensor.fromArray(cache.kPages, [cache.numPages, pageSize, kvHeads, dim]);
    using vPages = Tensor.fromArray(cache.vPages, [cache.numPages, pageSize, kvHeads, dim]);
    const staged = new ops.StagedPageTable(cache, 'cpu');
    expect([staged.batch, staged.maxPages]).toEqual([2, 3]);
    const a = ops.pagedDecodeAttention(q, { kPages, vPages }, staged);
    const b = ops.pagedDecodeAttention(q, { kPages, vPages }, staged);
    const plain = ops.pagedDecodeAttention(q, { kPages, vPages }, cache);
    expect([...(await a.out.toArray())]).toEqual([...(await plain.out.toArray())]);
    expect([...(await b.out.toArray())]).toEqual([...(await plain.out.toArray())]);
    staged.dispose();
    expect(() => ops.pagedDecodeAttention(q, { kPages, vPages }, staged)).toThrow(expect.objectContaining({ code: 'E_DISPOSED' }));
    // A table staged for a bigger pool is checked against this one at use.
    using small = Tensor.zeros([2, pageSize, kvHeads, dim]);
    expect(() => ops.pagedDecodeAttention(q, { kPages: small, vPages: small }, cache)).toThrow(expect.objectContaining({ code: 'E_RANGE' }));
    for (const t of [a.out, b.out, plain.out]) t.dispose();
  });

  it('appendPagedKV writes each token to its page and slot, leaving other slots alone', async () => {
    const random = rng(9);
    const [kvHeads, dim, pageSize] = [2, 4, 4];
    const lens = [6, 1, 9];
    const cache = pagedCache(lens, pageSize, kvHeads, dim, random);
    const row = kvHeads * dim;
    using kPages = Tensor.fromArray(cache.kPages, [cache.numPages, pageSize, kvHeads, dim]);
    using vPages = Tensor.fromArray(cache.vPages, [cache.numPages, pageSize, kvHeads, dim]);
    // New tokens: the last one of each sequence, plus the first of sequence 2.
    const batchIndices = [0, 1, 2, 2], positions = [5, 0, 8, 0];
    const k = normal(4 * row, random), v = normal(4 * row, random);
    using tk = Tensor.fromArray(k, [4, kvHeads, dim]);
    using tv = Tensor.fromArray(v, [4, kvHeads, dim]);
    ops.appendPagedKV(tk, tv, { kPages, vPages }, cache, { batchIndices, positions });
    const expectedK = Float32Array.from(cache.kPages), expectedV = Float32Array.from(cache.vPages);
    batchIndices.forEach((b, t) => {
      const page = cache.indices[cache.indptr[b]! + Math.floor(positions[t]! / pageSize)]!;
      const at = (page * pageSize + (positions[t]! % pageSize)) * row;
      expectedK.set(k.subarray(t * row, (t + 1) * row), at);
      expectedV.set(v.subarray(t * row, (t + 1) * row), at);
    });
    expect([...(await kPages.toArray())]).toEqual([...expectedK]);
    expect([...(await vPages.toArray())]).toEqual([...expectedV]);
  });
});

describe('attentionMass (CPU reference)', () => {
  it('gives each token the softmax weight its sequence\'s queries put on it, summed per KV head', async () => {
    const random = rng(13);
    const [heads, kvHeads, dim, pageSize] = [6, 2, 8, 4];
    const lens = [3, 11];
    const qLens = [2, 4]; // an observation window of queries at the end of each sequence
    const cache = pagedCache(lens, pageSize, kvHeads, dim, random);
    const cuSeqlensQ = offsets(qLens);
    const qData = normal(cuSeqlensQ.at(-1)! * heads * dim, random);
    using q = Tensor.fromArray(qData, [cuSeqlensQ.at(-1)!, heads, dim]);
    using kPages = Tensor.fromArray(cache.kPages, [cache.numPages, pageSize, kvHeads, dim]);
    using vPages = Tensor.fromArray(cache.vPages, [cache.numPages, pageSize, kvHeads, dim]);
    const attn = ops.pagedPrefillAttention(q, { kPages, vPages }, cache, { cuSeqlensQ, returnLse: true });
    using perToken = ops.attentionMass(q, kPages, cache, attn.lse!, { cuSeqlensQ, per: 'token' });
    using perPage = ops.attentionMass(q, kPages, cache, attn.lse!, { cuSeqlensQ });
    expect(perToken.shape).toEqual([14, kvHeads]);
    expect(perPage.shape).toEqual([cache.indices.length, kvHeads]);
    // The definition, in float64.
    const group = heads / kvHeads, scale = 1 / Math.sqrt(dim);
    const expected = new Float64Array(14 * kvHeads);
    let tokenBase = 0;
    lens.forEach((len, b) => {
      for (let i = 0; i < qLens[b]!; i++) {
        const pos = len - qLens[b]! + i;
        for (let g = 0; g < heads; g++) {
          const h = Math.floor(g / group);
          const logits = Array.from({ length: pos + 1 }, (_, j) => {
            let dot = 0;
            for (let d = 0; d < dim; d++) dot += qData[((cuSeqlensQ[b]! + i) * heads + g) * dim + d]! * cache.k[((tokenBase + j) * kvHeads + h) * dim + d]!;
            return dot * scale;
          });
          const max = Math.max(...logits);
          const sum = logits.reduce((a, l) => a + Math.exp(l - max), 0);
          logits.forEach((l, j) => (expected[(tokenBase + j) * kvHeads + h]! += Math.exp(l - max) / sum));
        }
      }
      tokenBase += len;
    });
    const tokens = (await perToken.toArray()) as Float32Array;
    expect(maxAbsDiff(tokens, expected)).toBeLessThan(1e-5);
    // Each query head's weights sum to one: per KV head, the total is queries x group.
    for (let h = 0; h < kvHeads; h++) {
      let total = 0;
      for (let t = 0; t < 14; t++) total += tokens[t * kvHeads + h]!;
      expect(total).toBeCloseTo((qLens[0]! + qLens[1]!) * group, 4);
    }
    // Per page: the page's tokens summed.
    const pages = (await perPage.toArray()) as Float32Array;
    const pageSums = new Float64Array(cache.indices.length * kvHeads);
    tokenBase = 0;
    lens.forEach((len, b) => {
      for (let j = 0; j < len; j++) {
        const entry = cache.indptr[b]! + Math.floor(j / pageSize);
        for (let h = 0; h < kvHeads; h++) pageSums[entry * kvHeads + h]! += tokens[(tokenBase + j) * kvHeads + h]!;
      }
      tokenBase += len;
    });
    expect(maxAbsDiff(pages, pageSums)).toBeLessThan(1e-5);
    attn.out.dispose();
    attn.lse!.dispose();
  });

  it('refuses lse that does not match q', () => {
    const random = rng(14);
    const cache = pagedCache([5], 4, 1, 8, random);
    using q = Tensor.zeros([1, 2, 8]);
    using kPages = Tensor.fromArray(cache.kPages, [cache.numPages, 4, 1, 8]);
    using lse = Tensor.zeros([1, 3]);
    expect(() => ops.attentionMass(q, kPages, cache, lse)).toThrow(expect.objectContaining({ code: 'E_SHAPE', message: 'Expected lse of f32 [1, 2] on cpu (from the attention call) but received f32 [1, 3] on cpu' }));
  });
});

describe('attention input checks', () => {
  const random = rng(1);
  const cache = pagedCache([5, 3], 4, 2, 8, random);
  const pool = () => ({
    kPages: Tensor.fromArray(cache.kPages, [cache.numPages, 4, 2, 8]),
    vPages: Tensor.fromArray(cache.vPages, [cache.numPages, 4, 2, 8]),
  });

  function error(fn: () => unknown): KvflashError {
    try {
      fn();
    } catch (e) {
      expect(e).toBeInstanceOf(KvflashError);
      return e as KvflashError;
    }
    throw new Error('expected a throw');
  }

  it('refuses page tables that point outside the pool or overrun a page', () => {
    const pages = pool();
    using q = Tensor.zeros([2, 4, 8]);
    const bad = error(() => ops.pagedDecodeAttention(q, pages, { ...cache, indices: [0, 1, cache.numPages] }));
    expect(bad.code).toBe('E_RANGE');
    expect(bad.message).toBe(`Expected indices[2] in [0, ${cache.numPages}) (the pages of kPages) but received ${cache.numPages}`);
    expect(error(() => ops.pagedDecodeAttention(q, pages, { ...cache, indices: [-1, 0, 1] })).code).toBe('E_RANGE');
    const last = error(() => ops.pagedDecodeAttention(q, pages, { ...cache, lastPageLen: [5, 3] }));
    expect(last.message).toBe('Expected lastPageLen[0] in [1, 4] but received 5');
    expect(error(() => ops.pagedDecodeAttention(q, pages, { ...cache, lastPageLen: [0, 3] })).code).toBe('E_RANGE');
    const empty = error(() => ops.pagedDecodeAttention(q, pages, { indptr: [0, 0, 3], indices: [0, 1, 2], lastPageLen: [1, 1] }));
    expect(empty.message).toBe('Expected at least one page for sequence 0 but indptr gives none');
    expect(error(() => ops.pagedDecodeAttention(q, pages, { ...cache, indptr: [0, 2] })).code).toBe('E_RANGE');
    using q3 = Tensor.zeros([3, 4, 8]);
    expect(error(() => ops.pagedDecodeAttention(q3, pages, cache)).message).toBe('Expected 2 rows (one per sequence of the page table) for q but received 3');
    pages.kPages.dispose();
    pages.vPages.dispose();
  });

  it('refuses offsets that decrease or do not end at the row count', () => {
    using q = Tensor.zeros([5, 2, 8]);
    using k = Tensor.zeros([6, 2, 8]);
    const dec = error(() => ops.prefillAttention(q, k, k, { cuSeqlensQ: [0, 3, 2, 5], cuSeqlensK: [0, 2, 4, 6] }));
    expect(dec.code).toBe('E_RANGE');
    expect(dec.message).toBe('Expected cuSeqlensQ to never decrease but received cuSeqlensQ[2] = 2 after 3');
    const end = error(() => ops.prefillAttention(q, k, k, { cuSeqlensQ: [0, 5], cuSeqlensK: [0, 5] }));
    expect(end.message).toBe('Expected cuSeqlensK to end at 6 (the rows of k) but received 5');
    expect(error(() => ops.prefillAttention(q, k, k, { cuSeqlensQ: [1, 5], cuSeqlensK: [0, 6] })).message).toBe('Expected cuSeqlensQ[0] = 0 but received 1');
    expect(error(() => ops.prefillAttention(q, k, k, { cuSeqlensQ: [0, 5], cuSeqlensK: [0, 2, 6] })).code).toBe('E_SHAPE');
    const causal = error(() => ops.prefillAttention(q, k, k, { cuSeqlensQ: [0, 4, 5], cuSeqlensK: [0, 2, 6] }));
    expect(causal.message).toBe('Expected no more queries than keys for causal sequence 0 but received 4 queries and 2 keys');
    expect(error(() => ops.prefillAttention(q, k, k, { cuSeqlensQ: [0, 5.5] as never, cuSeqlensK: [0, 6] })).message).toBe('Expected a 32-bit integer for cuSeqlensQ[1] but received 5.5 of type number');
  });

  it('refuses mismatched heads, dims, dtypes and ranks', () => {
    using q = Tensor.zeros([2, 6, 8]);
    using k4 = Tensor.zeros([2, 4, 8]);
    const heads = error(() => ops.prefillAttention(q, k4, k4, { cuSeqlensQ: [0, 2], cuSeqlensK: [0, 2] }));
    expect(heads.code).toBe('E_SHAPE');
    expect(heads.message).toBe('Expected the k heads to divide the 6 query heads but received 4');
    using kd = Tensor.zeros([2, 2, 16]);
    expect(error(() => ops.prefillAttention(q, kd, kd, { cuSeqlensQ: [0, 2], cuSeqlensK: [0, 2] })).message).toBe('Expected head dim 8 (from q) for k but received 16');
    using kb = Tensor.zeros([2, 2, 8], { dtype: 'bf16' });
    expect(error(() => ops.prefillAttention(q, kb, kb, { cuSeqlensQ: [0, 2], cuSeqlensK: [0, 2] })).message).toBe('Expected k of dtype f32 like q but received bf16 [2, 2, 8] on cpu');
    using qi = Tensor.zeros([2, 6, 8], { dtype: 'i32' });
    expect(error(() => ops.prefillAttention(qi, k4, k4, { cuSeqlensQ: [0, 2], cuSeqlensK: [0, 2] })).code).toBe('E_DTYPE');
    using q2 = Tensor.zeros([2, 48]);
    expect(error(() => ops.prefillAttention(q2, k4, k4, { cuSeqlensQ: [0, 2], cuSeqlensK: [0, 2] })).message).toBe('Expected rank 3 for q but received f32 [2, 48] on cpu');
    using k2 = Tensor.zeros([2, 2, 8]);
    expect(error(() => ops.prefillAttention(q, k2, k2, { cuSeqlensQ: [0, 2], cuSeqlensK: [0, 2], scale: -1 })).code).toBe('E_RANGE');
  });

  it('refuses appends outside a sequence and page sizes that are not powers of two', () => {
    const pages = pool();
    using k = Tensor.zeros([1, 2, 8]);
    const pos = error(() => ops.appendPagedKV(k, k, pages, cache, { batchIndices: [1], positions: [3] }));
    expect(pos.message).toBe('Expected positions[0] in [0, 3) (the length of sequence 1 in the page table) but received 3');
    expect(error(() => ops.appendPagedKV(k, k, pages, cache, { batchIndices: [2], positions: [0] })).code).toBe('E_RANGE');
    using odd = Tensor.zeros([4, 3, 2, 8]);
    using q = Tensor.zeros([1, 2, 8]);
    const p = error(() => ops.pagedDecodeAttention(q, { kPages: odd, vPages: odd }, { indptr: [0, 1], indices: [0], lastPageLen: [1] }));
    expect(p.message).toBe('Expected a power of two from 1 to 256 for the page size (kPages.shape[1]) but received 3');
    pages.kPages.dispose();
    pages.vPages.dispose();
  });
});
