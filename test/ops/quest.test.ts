// Quest on the CPU reference: bounds, exactness on one-token pages, incremental metadata, selection.
import { describe, expect, it } from 'vitest';

import { KvflashError, ops, Tensor } from '../../lib/index';
import { maxAbsDiff, normal, pagedCache, rng } from '../attention-fixtures';
import { selectPages, truePageMaxima } from '../quest-fixtures';

function poolOf(cache: ReturnType<typeof pagedCache>, kvHeads: number, dim: number) {
  const shape = [cache.numPages, cache.pageSize, kvHeads, dim];
  return { kPages: Tensor.fromArray(cache.kPages, shape), vPages: Tensor.fromArray(cache.vPages, shape) };
}

/** A random cache with its metadata and Gaussian queries; the caller disposes of the tensors. */
function questScene(seed: number, [heads, kvHeads, dim, pageSize]: readonly number[], lengths: number[]) {
  const random = rng(seed);
  const cache = pagedCache(lengths, pageSize!, kvHeads!, dim!, random);
  const { kPages, vPages } = poolOf(cache, kvHeads!, dim!);
  const meta = ops.createQuestMeta(kPages);
  ops.buildQuestMeta(kPages, meta, cache);
  const q = Tensor.fromArray(normal(lengths.length * heads! * dim!, random), [lengths.length, heads!, dim!]);
  return { cache, kPages, vPages, meta, q };
}

describe('Quest scores (CPU reference)', () => {
  const keyKinds = {
    gaussian: (n: number, random: () => number) => normal(n, random),
    // Adversarial: large outlier channels of both signs, and runs of identical keys.
    adversarial: (n: number, random: () => number) => normal(n, random).map((x, i) => (i % 13 === 0 ? x * 50 : i % 7 === 0 ? -3 : x)),
  };
  for (const [kind, makeKeys] of Object.entries(keyKinds)) {
    it(`bounds q·k over every page from above (${kind} keys)`, async () => {
      const random = rng(kind.length);
      const [heads, kvHeads, dim, pageSize] = [8, 2, 16, 4];
      const lengths = [1, 5, 16, 23];
      const cache = pagedCache(lengths, pageSize, kvHeads, dim, random);
      cache.k.set(makeKeys(cache.k.length, random));
      // Put the new keys into the pool at their slots.
      let token = 0;
      lengths.forEach((len, b) => {
        for (let j = 0; j < len; j++, token++) {
          const page = cache.indices[cache.indptr[b]! + Math.floor(j / pageSize)]!;
          cache.kPages.set(cache.k.subarray(token * kvHeads * dim, (token + 1) * kvHeads * dim), (page * pageSize + (j % pageSize)) * kvHeads * dim);
        }
      });
      const { kPages, vPages } = poolOf(cache, kvHeads, dim);
      using meta = ops.createQuestMeta(kPages);
      ops.buildQuestMeta(kPages, meta, cache);
      const qData = normal(lengths.length * heads * dim, random);
      using q = Tensor.fromArray(qData, [lengths.length, heads, dim]);
      using scores = ops.questScores(q, kPages, meta, cache);
      expect(scores.shape).toEqual([cache.indices.length, kvHeads]);
      const bound = (await scores.toArray()) as Float32Array;
      const truth = truePageMaxima(cache, lengths, qData, heads, kvHeads, dim);
      for (let i = 0; i < truth.length; i++) expect(bound[i]!, `entry ${i}`).toBeGreaterThanOrEqual(truth[i]! - 1e-3 * Math.max(1, Math.abs(truth[i]!)));
      kPages.dispose();
      vPages.dispose();
    });
  }

  it('equals q·k exactly on one-token pages', async () => {
    const random = rng(17);
    const [heads, kvHeads, dim] = [6, 3, 32];
    const lengths = [1, 4, 9];
    const cache = pagedCache(lengths, 1, kvHeads, dim, random);
    const { kPages, vPages } = poolOf(cache, kvHeads, dim);
    using meta = ops.createQuestMeta(kPages);
    ops.buildQuestMeta(kPages, meta, cache);
    const qData = normal(lengths.length * heads * dim, random);
    using q = Tensor.fromArray(qData, [lengths.length, heads, dim]);
    using scores = ops.questScores(q, kPages, meta, cache);
    const truth = truePageMaxima(cache, lengths, qData, heads, kvHeads, dim);
    expect(maxAbsDiff((await scores.toArray()) as Float32Array, truth)).toBeLessThan(1e-4);
    kPages.dispose();
    vPages.dispose();
  });

  it('keeps metadata built token by token equal, bit for bit, to metadata built in one pass', async () => {
    const random = rng(23);
    const [kvHeads, dim, pageSize] = [2, 8, 4];
    const lengths = [7, 1, 12];
    const cache = pagedCache(lengths, pageSize, kvHeads, dim, random);
    for (const dtype of ['bf16', 'f32'] as const) {
      const shape = [cache.numPages, pageSize, kvHeads, dim];
      using kPages = Tensor.fromArray(cache.kPages, shape, { dtype });
      using vPages = Tensor.fromArray(cache.vPages, shape, { dtype });
      using kFull = Tensor.fromArray(cache.k, [cache.k.length / (kvHeads * dim), kvHeads, dim], { dtype });
      using oneShot = ops.createQuestMeta(kPages);
      ops.buildQuestMeta(kPages, oneShot, cache);
      // Grow each sequence one token at a time, appending with the metadata kept current.
      using incremental = ops.createQuestMeta(kPages).fill(7);
      let token = 0;
      for (let b = 0; b < lengths.length; b++) {
        for (let j = 0; j < lengths[b]!; j++, token++) {
          const pages = Math.floor(j / pageSize) + 1;
          const table = { indptr: [0, pages], indices: cache.indices.slice(cache.indptr[b]!, cache.indptr[b]! + pages), lastPageLen: [(j % pageSize) + 1] };
          using k = kFull.slice(token, token + 1);
          ops.appendPagedKV(k, k, { kPages, vPages }, table, { batchIndices: [0], positions: [j], questMeta: incremental });
        }
      }
      // Only pages the table uses are defined; compare those.
      const a = await oneShot.toArray(), c = await incremental.toArray();
      const row = 2 * kvHeads * dim;
      for (const page of cache.indices) expect([...c.slice(page * row, (page + 1) * row)]).toEqual([...a.slice(page * row, (page + 1) * row)]);
    }
  });
});

describe('Quest selection (CPU reference)', () => {
  it('keeps the last page and the best others, in page order, earlier pages first on ties', async () => {
    const random = rng(29);
    const kvHeads = 2;
    const cache = pagedCache([3, 40, 17, 64], 1, kvHeads, 4, random);
    const scores = new Float32Array(cache.indices.length * kvHeads);
    for (let i = 0; i < scores.length; i++) scores[i] = Math.floor(random() * 6); // many ties
    using t = Tensor.fromArray(scores, [cache.indices.length, kvHeads]);
    for (const budget of [1, 2, 5, 17, 100]) {
      using selected = ops.topkPages(t, cache, budget);
      expect(selected.rowsPerSequence).toBe(kvHeads);
      const arrays = await selected.toArrays();
      expect([...arrays.indices]).toEqual(selectPages(scores, cache.indptr, cache.indices, kvHeads, budget));
      expect([...arrays.lastPageLen]).toEqual([...cache.lastPageLen].flatMap((l) => [l, l]));
    }
  });

  it('gives exactly the dense decode when the budget covers every page', async () => {
    const { cache, kPages, vPages, meta, q } = questScene(31, [8, 2, 16, 4], [5, 30, 1]);
    using scores = ops.questScores(q, kPages, meta, cache);
    using selected = ops.topkPages(scores, cache, 8);
    const sparse = ops.pagedDecodeAttention(q, { kPages, vPages }, selected, { returnLse: true });
    const dense = ops.pagedDecodeAttention(q, { kPages, vPages }, cache, { returnLse: true });
    expect([...(await sparse.out.toArray())]).toEqual([...(await dense.out.toArray())]);
    expect([...(await sparse.lse!.toArray())]).toEqual([...(await dense.lse!.toArray())]);
    for (const x of [sparse.out, sparse.lse!, dense.out, dense.lse!, kPages, vPages, meta, q]) x.dispose();
  });

  it('decodes each KV head over its own selection', async () => {
    const random = rng(37);
    const [heads, kvHeads, dim, pageSize] = [4, 2, 8, 2];
    const lengths = [9, 14];
    const cache = pagedCache(lengths, pageSize, kvHeads, dim, random);
    const { kPages, vPages } = poolOf(cache, kvHeads, dim);
    using q = Tensor.fromArray(normal(2 * heads * dim, random), [2, heads, dim]);
    // Scores chosen so the two heads keep different pages.
    const scores = Float32Array.from({ length: cache.indices.length * kvHeads }, (_, i) => ((i * 7919) % 13) * (i % 2 ? 1 : -1));
    using t = Tensor.fromArray(scores, [cache.indices.length, kvHeads]);
    using selected = ops.topkPages(t, cache, 3);
    const sparse = ops.pagedDecodeAttention(q, { kPages, vPages }, selected);
    // Per head, the same result as a dense decode over a one-head table of exactly those pages.
    const { indptr, indices, lastPageLen } = await selected.toArrays();
    const out = (await sparse.out.toArray()) as Float32Array;
    for (let b = 0; b < 2; b++) {
      for (let h = 0; h < kvHeads; h++) {
        const row = b * kvHeads + h;
        const table = { indptr: [0, indptr[row + 1]! - indptr[row]!], indices: indices.slice(indptr[row]!, indptr[row + 1]!), lastPageLen: [lastPageLen[row]!] };
        using qb = q.slice(b, b + 1);
        const one = ops.pagedDecodeAttention(qb, { kPages, vPages }, table);
        const ref = (await one.out.toArray()) as Float32Array;
        const group = heads / kvHeads;
        const at = (h * group) * dim, len = group * dim;
        expect([...out.slice(b * heads * dim + at, b * heads * dim + at + len)]).toEqual([...ref.slice(at, at + len)]);
        one.out.dispose();
      }
    }
    for (const x of [sparse.out, kPages, vPages]) x.dispose();
  });

  it('refuses a budget below 1, metadata of another layout, and selections where dense tables are needed', () => {
    const random = rng(41);
    const cache = pagedCache([6, 3], 2, 2, 8, random);
    const { kPages, vPages } = poolOf(cache, 2, 8);
    using scores = Tensor.zeros([cache.indices.length, 2]);
    const budget = (() => { try { ops.topkPages(scores, cache, 0); } catch (e) { return e as KvflashError; } })()!;
    expect(budget.code).toBe('E_RANGE');
    expect(budget.message).toBe('Expected integer in [1, 2147483647] for budgetPages but received 0 of type number');
    using wrongMeta = Tensor.zeros([cache.numPages, 2, 2, 4]);
    expect(() => ops.buildQuestMeta(kPages, wrongMeta, cache)).toThrow(expect.objectContaining({ code: 'E_SHAPE', message: `Expected meta of shape [${cache.numPages}, 2, 2, 8] ([numPages, 2, kvHeads, headDim] of this page pool) but received [${cache.numPages}, 2, 2, 4]` }));
    using selected = ops.topkPages(scores, cache, 1);
    using k = Tensor.zeros([1, 2, 8]);
    expect(() => ops.appendPagedKV(k, k, { kPages, vPages }, selected, { batchIndices: [0], positions: [0] })).toThrow(expect.objectContaining({ code: 'E_RANGE' }));
    using meta = ops.createQuestMeta(kPages);
    using q = Tensor.zeros([2, 4, 8]);
    expect(() => ops.questScores(q, kPages, meta, selected)).toThrow(expect.objectContaining({ code: 'E_RANGE' }));
    using wrongRows = Tensor.zeros([3, 2]);
    expect(() => ops.topkPages(wrongRows, cache, 2)).toThrow(expect.objectContaining({ code: 'E_SHAPE' }));
    kPages.dispose();
    vPages.dispose();
  });
});

describe('Quest decode in one op (CPU reference)', () => {
  it('equals pagedDecodeAttention over topkPages(questScores), bit for bit', async () => {
    const { cache, kPages, vPages, meta, q } = questScene(43, [6, 2, 16, 4], [1, 13, 40, 4]);
    using scores = ops.questScores(q, kPages, meta, cache);
    for (const budget of [1, 2, 3, 10, 11]) {
      using selected = ops.topkPages(scores, cache, budget);
      const steps = ops.pagedDecodeAttention(q, { kPages, vPages }, selected, { returnLse: true, scale: 0.3 });
      const one = ops.questDecodeAttention(q, { kPages, vPages }, meta, cache, budget, { returnLse: true, scale: 0.3 });
      expect([...(await one.out.toArray())], `budget ${budget}`).toEqual([...(await steps.out.toArray())]);
      expect([...(await one.lse!.toArray())]).toEqual([...(await steps.lse!.toArray())]);
      for (const t of [steps.out, steps.lse!, one.out, one.lse!]) t.dispose();
    }
    for (const t of [kPages, vPages, meta, q]) t.dispose();
  });

  it('refuses a budget below 1, metadata of another layout, a per-KV-head table and a wrong batch', () => {
    const random = rng(47);
    const cache = pagedCache([6, 3], 2, 2, 8, random);
    const { kPages, vPages } = poolOf(cache, 2, 8);
    using meta = ops.createQuestMeta(kPages);
    using q = Tensor.zeros([2, 4, 8]);
    const pool = { kPages, vPages };
    expect(() => ops.questDecodeAttention(q, pool, meta, cache, 0)).toThrow(
      expect.objectContaining({ code: 'E_RANGE', message: 'Expected integer in [1, 2147483647] for budgetPages but received 0 of type number' }),
    );
    using wrongMeta = Tensor.zeros([cache.numPages, 2, 2, 4]);
    expect(() => ops.questDecodeAttention(q, pool, wrongMeta, cache, 2)).toThrow(
      expect.objectContaining({ code: 'E_SHAPE', message: `Expected meta of shape [${cache.numPages}, 2, 2, 8] ([numPages, 2, kvHeads, headDim] of this page pool) but received [${cache.numPages}, 2, 2, 4]` }),
    );
    using scores = Tensor.zeros([cache.indices.length, 2]);
    using selected = ops.topkPages(scores, cache, 1);
    expect(() => ops.questDecodeAttention(q, pool, meta, selected, 2)).toThrow(expect.objectContaining({ code: 'E_RANGE' }));
    using q3 = Tensor.zeros([3, 4, 8]);
    expect(() => ops.questDecodeAttention(q3, pool, meta, cache, 2)).toThrow(expect.objectContaining({ code: 'E_SHAPE' }));
    expect(() => ops.questScores(q3, kPages, meta, cache)).toThrow('Expected 2 rows (one per sequence of the page table) for q but received 3');
    kPages.dispose();
    vPages.dispose();
  });
});

