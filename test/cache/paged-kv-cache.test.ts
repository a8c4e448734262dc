// PagedKVCache: appends land in the right slots, forks share and copy on write, steps stage one table
// for all layers, and every refusal names its argument and leaves the cache as it was.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';

import { PagedKVCache } from '../../lib/cache/index';
import { KvflashError, ops, Tensor } from '../../lib/index';
import { normal, rng } from '../attention-fixtures';
import { appendTokens, codeOf, decodeSequence, kvTensors, readPools, smallCache } from './fixtures';

const range = (from: number, to: number) => Array.from({ length: to - from }, (_, i) => from + i);

/** Everything observable about a cache, to show that a refused call changed nothing. */
async function snapshot(cache: PagedKVCache) {
  const sequences = cache.sequences().map((seq) => cache.info(seq));
  return { stats: cache.stats(), sequences, pools: await readPools(cache) };
}

describe('PagedKVCache', () => {
  it('appends tokens into pages on every layer and builds the CSR table', async () => {
    using cache = smallCache();
    const a = cache.addSequence();
    const b = cache.addSequence();
    appendTokens(cache, a, range(10, 16));
    appendTokens(cache, b, [7]);
    appendTokens(cache, a, [20, 21, 22]);
    const pools = await readPools(cache);
    for (const layer of [0, 1]) {
      expect(decodeSequence(cache, pools, a, layer).map((s) => s.token)).toEqual([...range(10, 16), 20, 21, 22]);
      expect(decodeSequence(cache, pools, b, layer)).toEqual([{ token: 7, position: 0 }]);
    }
    const table = cache.pageTable([b, a]);
    const pagesA = cache.info(a).pages;
    expect([...table.indptr]).toEqual([0, 1, 4]);
    expect([...table.indices]).toEqual([...cache.info(b).pages, ...pagesA]);
    expect([...table.lastPageLen]).toEqual([1, 1]);
    expect(cache.stats()).toMatchObject({ used: 4, free: 12, shared: 0, sequences: 2, tokens: 10 });
  });

  it('lets layers run ahead of each other with the single-sequence append', async () => {
    using cache = smallCache();
    const seq = cache.addSequence();
    const [k0, v0] = kvTensors(cache, [1, 2, 3], 0, 0);
    cache.append(seq, 0, k0, v0);
    expect(cache.info(seq)).toMatchObject({ length: 3, written: Int32Array.from([3, 0]) });
    const [k1, v1] = kvTensors(cache, [1, 2, 3], 0, 1);
    cache.append(seq, 1, k1, v1);
    expect(cache.info(seq).written).toEqual(Int32Array.from([3, 3]));
    expect(decodeSequence(cache, await readPools(cache), seq, 1).map((s) => s.token)).toEqual([1, 2, 3]);
    [k0, v0, k1, v1].forEach((t) => t.dispose());
  });

  it('forks by sharing pages and copies a shared page before its first write', async () => {
    using cache = smallCache();
    const parent = cache.addSequence();
    appendTokens(cache, parent, range(1, 7)); // pages: one full, one holding 2 of 4
    const child = cache.fork(parent);
    const shared = cache.info(parent).pages;
    expect(cache.info(child).pages).toEqual(shared);
    expect(cache.stats()).toMatchObject({ used: 2, shared: 2 });
    appendTokens(cache, child, [50]);
    const childPages = cache.info(child).pages;
    expect(childPages[0]).toBe(shared[0]);
    expect(childPages[1]).not.toBe(shared[1]);
    expect(cache.refCount(shared[0]!)).toBe(2);
    expect(cache.refCount(shared[1]!)).toBe(1);
    appendTokens(cache, parent, [60, 61]);
    const pools = await readPools(cache);
    expect(decodeSequence(cache, pools, parent).map((s) => s.token)).toEqual([...range(1, 7), 60, 61]);
    expect(decodeSequence(cache, pools, child).map((s) => s.token)).toEqual([...range(1, 7), 50]);
  });

  it('gives the same attention over a forked sequence as over an unshared copy of its data', async () => {
    const shapes = fc.record({
      pageSize: fc.constantFrom(1, 2, 4, 8),
      prompt: fc.integer({ min: 1, max: 20 }),
      extra: fc.integer({ min: 1, max: 9 }),
      parentExtra: fc.integer({ min: 0, max: 9 }),
      seed: fc.nat(),
    });
    await fc.assert(
      fc.asyncProperty(shapes, async ({ pageSize, prompt, extra, parentExtra, seed }) => {
        const random = rng(seed);
        const [heads, kvHeads, headDim] = [4, 2, 8];
        using cache = new PagedKVCache({ layers: 1, numPages: 3 * Math.ceil(30 / pageSize), pageSize, kvHeads, headDim, dtype: 'f32' });
        const row = kvHeads * headDim;
        const keys = normal((prompt + 9) * row, random), values = normal((prompt + 9) * row, random);
        const other = normal(9 * row, random);
        const write = (seq: number, k: Float32Array, v: Float32Array) => {
          using tk = Tensor.fromArray(k, [k.length / row, kvHeads, headDim]);
          using tv = Tensor.fromArray(v, [v.length / row, kvHeads, headDim]);
          cache.append(seq, 0, tk, tv);
        };
        const parent = cache.addSequence();
        write(parent, keys.subarray(0, prompt * row), values.subarray(0, prompt * row));
        const forked = cache.fork(parent);
        write(forked, keys.subarray(prompt * row, (prompt + extra) * row), values.subarray(prompt * row, (prompt + extra) * row));
        // The parent diverges too, writing other data into what was the shared last page.
        if (parentExtra > 0) write(parent, other.subarray(0, parentExtra * row), other.subarray(0, parentExtra * row));
        const unshared = cache.addSequence();
        write(unshared, keys.subarray(0, (prompt + extra) * row), values.subarray(0, (prompt + extra) * row));
        const query = normal(heads * headDim, random);
        using q = Tensor.fromArray([...query, ...query], [2, heads, headDim]);
        using table = cache.stagePageTable([forked, unshared]);
        const { out } = ops.pagedDecodeAttention(q, cache.pages(0), table);
        using _out = out;
        const rows = (await out.toArray()) as Float32Array;
        const half = heads * headDim;
        expect([...rows.subarray(0, half)]).toEqual([...rows.subarray(half)]);
      }),
      { numRuns: 40 },
    );
  });

  it('stages one page table per step for all layers and places every new token', async () => {
    using cache = smallCache();
    const a = cache.addSequence(), b = cache.addSequence();
    appendTokens(cache, a, [1, 2, 3]);
    using step = cache.beginStep([
      { seq: b, tokens: 2 },
      { seq: a, tokens: 1 },
    ]);
    expect([...step.cuSeqlensQ]).toEqual([0, 2, 3]);
    expect([...step.batchIndices]).toEqual([0, 0, 1]);
    expect([...step.slots]).toEqual([0, 1, 3]);
    expect([...step.positions]).toEqual([0, 1, 3]);
    expect(step.table.batch).toBe(2);
    for (let layer = 0; layer < cache.layers; layer++) {
      const [kb, vb] = kvTensors(cache, [8, 9], 0, layer);
      const [ka, va] = kvTensors(cache, [4], 3, layer);
      using k = Tensor.fromArray([...((await kb.toArray()) as Float32Array), ...((await ka.toArray()) as Float32Array)], [3, 2, 2]);
      using v = Tensor.fromArray([...((await vb.toArray()) as Float32Array), ...((await va.toArray()) as Float32Array)], [3, 2, 2]);
      step.append(layer, k, v);
      expect(codeOf(() => step.append(layer, k, v))).toBe('E_RANGE'); // a layer once per step
      [kb, vb, ka, va].forEach((t) => t.dispose());
    }
    const pools = await readPools(cache);
    expect(decodeSequence(cache, pools, a, 1).map((s) => s.token)).toEqual([1, 2, 3, 4]);
    expect(decodeSequence(cache, pools, b, 1).map((s) => s.token)).toEqual([8, 9]);
    cache.fork(a);
    using later = cache.beginStep([{ seq: a, tokens: 1 }]);
    expect(codeOf(() => step.append(0, ...kvTensors(cache, [1, 2, 3], 0, 0)))).toBe('E_RANGE'); // stale after the fork
    expect(later.table.batch).toBe(1);
  });

  it('refuses a step while a layer is behind, and a sequence listed twice', () => {
    using cache = smallCache();
    const seq = cache.addSequence();
    const [k, v] = kvTensors(cache, [1], 0, 0);
    cache.append(seq, 0, k, v);
    expect(() => cache.beginStep([{ seq, tokens: 1 }])).toThrow(/some layer is behind/);
    const other = cache.addSequence();
    expect(() => cache.beginStep([{ seq: other, tokens: 1 }, { seq: other, tokens: 1 }])).toThrow('Expected each sequence once per step for entries[1].seq');
    expect(cache.stats().used).toBe(1);
  });

  it('truncates to a length, freeing the pages past it, and copies a shared page it then writes', async () => {
    using cache = smallCache();
    const seq = cache.addSequence();
    appendTokens(cache, seq, range(1, 11));
    const fork = cache.fork(seq);
    cache.truncate(seq, 5);
    expect(cache.info(seq)).toMatchObject({ length: 5, nextPosition: 5, written: Int32Array.from([5, 5]) });
    expect(cache.info(seq).pages).toHaveLength(2);
    appendTokens(cache, seq, [70, 71]);
    const pools = await readPools(cache);
    expect(decodeSequence(cache, pools, seq).map((s) => s.token)).toEqual([1, 2, 3, 4, 5, 70, 71]);
    expect(decodeSequence(cache, pools, fork).map((s) => s.token)).toEqual(range(1, 11));
    cache.truncate(seq, 0);
    expect(cache.info(seq)).toMatchObject({ length: 0, nextPosition: 0, pages: new Int32Array(0) });
  });

  it('refuses bad input with the argument named and the cache unchanged', async () => {
    using cache = smallCache();
    const seq = cache.addSequence();
    appendTokens(cache, seq, [1, 2, 3, 4, 5]);
    const freed = cache.addSequence();
    cache.free(freed);
    const before = await snapshot(cache);
    const [k, v] = kvTensors(cache, [9], 5, 0);
    using kWide = Tensor.zeros([1, 3, 2]);
    using kHalf = Tensor.zeros([1, 2, 2], { dtype: 'f16' });
    using vTwo = Tensor.zeros([2, 2, 2]);
    expect(() => cache.free(freed)).toThrow('Expected a live sequence id (this one was freed) for seq but received 1 of type number');
    expect(() => cache.append(freed, 0, k, v)).toThrow(expect.objectContaining({ code: 'E_RANGE' }));
    expect(() => cache.append(42, 0, k, v)).toThrow('Expected a sequence id from addSequence or fork for seq but received 42 of type number');
    expect(() => cache.append(seq, 2, k, v)).toThrow('Expected integer in [0, 2) for layer but received 2 of type number');
    expect(() => cache.append(seq, 0, kWide, v)).toThrow('Expected shape [n >= 1, 2, 2] for k but received [1, 3, 2]');
    expect(() => cache.append(seq, 0, k, vTwo)).toThrow('Expected shape [1, 2, 2] for v but received [2, 2, 2]');
    expect(codeOf(() => cache.append(seq, 0, kHalf, v))).toBe('E_DTYPE');
    expect(codeOf(() => cache.fork(freed))).toBe('E_RANGE');
    expect(() => cache.truncate(seq, 6)).toThrow('Expected integer in [0, 5] for length but received 6 of type number');
    expect(codeOf(() => cache.pageTable([seq, freed]))).toBe('E_RANGE');
    expect(codeOf(() => cache.pageTable([cache.addSequence()]))).toBe('E_RANGE'); // empty sequence
    expect(codeOf(() => cache.beginStep([{ seq, tokens: 0 }]))).toBe('E_RANGE');
    expect(codeOf(() => cache.recordAttentionMass(seq, [1]))).toBe('E_SHAPE');
    expect(codeOf(() => cache.compress(seq, []))).toBe('E_UNSUPPORTED');
    expect(codeOf(() => cache.addSequence({ prompt: [1, -2] }))).toBe('E_RANGE');
    const after = await snapshot(cache);
    expect({ ...after.stats, sequences: 0 }).toEqual({ ...before.stats, sequences: 0 }); // one empty sequence was added above
    expect(after.sequences.slice(0, 1)).toEqual(before.sequences);
    expect(after.pools).toEqual(before.pools);
    k.dispose();
    v.dispose();
  });

  it('refuses bad options', () => {
    const base = { layers: 1, numPages: 4, pageSize: 4, kvHeads: 1, headDim: 4, dtype: 'f32' } as const;
    expect(() => new PagedKVCache({ ...base, pageSize: 3 })).toThrow('Expected power of two from 1 to 256 for pageSize but received 3 of type number');
    expect(() => new PagedKVCache({ ...base, layers: -1 })).toThrow('Expected positive integer for layers but received -1 of type number');
    expect(codeOf(() => new PagedKVCache({ ...base, dtype: 'f64' as 'f32' }))).toBe('E_DTYPE');
    expect(codeOf(() => new PagedKVCache({ ...base, device: 'tpu' as 'cpu' }))).toBe('E_DEVICE');
    expect(() => new PagedKVCache({ ...base, quant: { bits: 8 } as never })).toThrow(expect.objectContaining({ code: 'E_UNSUPPORTED', message: expect.stringContaining('quant') }));
    expect(() => new PagedKVCache({ ...base, quest: {} as boolean })).toThrow('Expected a boolean for quest but received an instance of Object');
    using plain = new PagedKVCache(base);
    expect(() => plain.questMeta(0)).toThrow(expect.objectContaining({ code: 'E_UNSUPPORTED' }));
  });

  it('runs out of pages with E_OOM and the stats, writing nothing', async () => {
    using cache = smallCache({ numPages: 3 });
    const a = cache.addSequence(), b = cache.addSequence();
    appendTokens(cache, a, range(1, 9));
    const before = await snapshot(cache);
    let error: (KvflashError & { stats?: unknown }) | undefined;
    try {
      cache.beginStep([
        { seq: a, tokens: 1 },
        { seq: b, tokens: 1 },
      ]);
    } catch (e) {
      error = e as KvflashError;
    }
    expect(error?.code).toBe('E_OOM');
    expect(error?.stats).toMatchObject({ capacity: 3, used: 2, free: 1, sequences: 2, tokens: 8 });
    expect(await snapshot(cache)).toEqual(before);
  });

  it('frees its pools on dispose and refuses use afterwards', () => {
    const cache = smallCache();
    const seq = cache.addSequence();
    appendTokens(cache, seq, [1]);
    const pool = cache.pages(0).kPages;
    cache.dispose();
    expect(pool.disposed).toBe(true);
    expect(cache.disposed).toBe(true);
    expect(codeOf(() => cache.info(seq))).toBe('E_DISPOSED');
    cache.dispose();
  });
});
