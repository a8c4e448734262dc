// GPU suite: Quest kernels against the CPU reference.
import { describe, expect, it } from 'vitest';

import { ops, Tensor } from '../../lib/index';
import { maxAbsDiff, normal, pagedCache, type PagedCache, rng } from '../attention-fixtures';
import { quantizedCache } from '../quant-fixtures';

const device = 'cuda:0' as const;

/** One Quest decode's inputs on the GPU and on the CPU: pools, queries, metadata built over the table. */
function decodeInputs(cache: PagedCache, keys: Float32Array, queries: Float32Array, heads: number, kvHeads: number, dim: number, dtype: 'bf16' | 'f16') {
  const shape = [cache.numPages, cache.pageSize, kvHeads, dim];
  const opts = { dtype, device } as const;
  const kPages = Tensor.fromArray(keys, shape, opts);
  const vPages = Tensor.fromArray(cache.vPages, shape, opts);
  const q = Tensor.fromArray(queries, [cache.lastPageLen.length, heads, dim], opts);
  const [kc, vc, qc] = [kPages.to('cpu'), vPages.to('cpu'), q.to('cpu')];
  const [meta, metaC] = [ops.createQuestMeta(kPages), ops.createQuestMeta(kc)];
  const table = new ops.StagedPageTable(cache, device);
  ops.buildQuestMeta(kPages, meta, table);
  ops.buildQuestMeta(kc, metaC, cache);
  const owned = [kPages, vPages, q, kc, vc, qc, meta, metaC, table];
  return {
    gpu: { q, pages: { kPages, vPages }, meta, table },
    cpu: { q: qc, pages: { kPages: kc, vPages: vc }, meta: metaC, table: cache },
    [Symbol.dispose]: () => owned.forEach((x) => x.dispose()),
  };
}

describe('Quest on CUDA', () => {
  for (const dim of [64, 128, 256]) {
    it(`metadata (one pass and token by token) and scores match the reference (D=${dim})`, async () => {
      const random = rng(500 + dim);
      const [heads, kvHeads, pageSize] = [16, 4, 16];
      const lengths = [1, 17, 300, 64];
      const cache = pagedCache(lengths, pageSize, kvHeads, dim, random);
      const shape = [cache.numPages, pageSize, kvHeads, dim];
      using kPages = Tensor.fromArray(cache.kPages, shape, { dtype: 'bf16', device });
      using vPages = Tensor.fromArray(cache.vPages, shape, { dtype: 'bf16', device });
      using kPagesC = kPages.to('cpu');
      using meta = ops.createQuestMeta(kPages);
      using metaC = ops.createQuestMeta(kPagesC);
      ops.buildQuestMeta(kPages, meta, cache);
      ops.buildQuestMeta(kPagesC, metaC, cache);
      const row = 2 * kvHeads * dim * 2; // bytes of one page's metadata
      const [g, c] = [Buffer.from(await meta.bytes()), Buffer.from(await metaC.bytes())];
      for (const page of cache.indices) expect(g.subarray(page * row, (page + 1) * row).equals(c.subarray(page * row, (page + 1) * row))).toBe(true);

      // Appending the last token of each sequence again, through the GPU, keeps metadata identical.
      using kNew = Tensor.fromArray(normal(lengths.length * kvHeads * dim, random), [lengths.length, kvHeads, dim], { dtype: 'bf16', device });
      const where = { batchIndices: [0, 1, 2, 3], positions: lengths.map((l) => l - 1) };
      ops.appendPagedKV(kNew, kNew, { kPages, vPages }, cache, { ...where, questMeta: meta });
      using fresh = ops.createQuestMeta(kPages);
      ops.buildQuestMeta(kPages, fresh, cache);
      const [inc, one] = [Buffer.from(await meta.bytes()), Buffer.from(await fresh.bytes())];
      for (const page of cache.indices) expect(inc.subarray(page * row, (page + 1) * row).equals(one.subarray(page * row, (page + 1) * row))).toBe(true);

      using q = Tensor.fromArray(normal(lengths.length * heads * dim, random), [lengths.length, heads, dim], { dtype: 'bf16', device });
      using qc = q.to('cpu');
      using kNow = kPages.to('cpu');
      using metaNow = fresh.to('cpu');
      using scores = ops.questScores(q, kPages, fresh, cache);
      using scoresC = ops.questScores(qc, kNow, metaNow, cache);
      const [sg, sc] = [(await scores.toArray()) as Float32Array, (await scoresC.toArray()) as Float32Array];
      expect(maxAbsDiff(sg, sc)).toBeLessThan(1e-3 * Math.max(...sc.map(Math.abs)));
    });
  }

  it('decodes each KV head over its own selection as the reference does', async () => {
    const random = rng(700);
    const [heads, kvHeads, dim, pageSize] = [32, 8, 128, 16];
    const lengths = [4000, 100, 16];
    const cache = pagedCache(lengths, pageSize, kvHeads, dim, random);
    const shape = [cache.numPages, pageSize, kvHeads, dim];
    using kPages = Tensor.fromArray(cache.kPages, shape, { dtype: 'bf16', device });
    using vPages = Tensor.fromArray(cache.vPages, shape, { dtype: 'bf16', device });
    using q = Tensor.fromArray(normal(lengths.length * heads * dim, random), [lengths.length, heads, dim], { dtype: 'bf16', device });
    using meta = ops.createQuestMeta(kPages);
    using table = new ops.StagedPageTable(cache, device);
    ops.buildQuestMeta(kPages, meta, table);
    using scores = ops.questScores(q, kPages, meta, table);
    using selected = ops.topkPages(scores, table, 32);
    const gpu = ops.pagedDecodeAttention(q, { kPages, vPages }, selected, { returnLse: true });
    // The same selection on the host, and the reference decode over it.
    const arrays = await selected.toArrays();
    using kc = kPages.to('cpu');
    using vc = vPages.to('cpu');
    using qc = q.to('cpu');
    using scoresC = scores.to('cpu');
    using hostSelection = ops.topkPages(scoresC, cache, 32);
    expect([...(await hostSelection.toArrays()).indices]).toEqual([...arrays.indices]);
    const cpu = ops.pagedDecodeAttention(qc, { kPages: kc, vPages: vc }, hostSelection, { returnLse: true });
    expect(maxAbsDiff((await gpu.out.toArray()) as Float32Array, (await cpu.out.toArray()) as Float32Array)).toBeLessThan(2e-2);
    expect(maxAbsDiff((await gpu.lse!.toArray()) as Float32Array, (await cpu.lse!.toArray()) as Float32Array)).toBeLessThan(1e-3);
    // A budget that covers every page gives exactly the dense decode.
    using all = ops.topkPages(scores, table, 1000);
    const sparse = ops.pagedDecodeAttention(q, { kPages, vPages }, all, { returnLse: true });
    const dense = ops.pagedDecodeAttention(q, { kPages, vPages }, table, { returnLse: true });
    expect(Buffer.from(await sparse.out.bytes()).equals(Buffer.from(await dense.out.bytes()))).toBe(true);
    for (const t of [gpu.out, gpu.lse!, cpu.out, cpu.lse!, sparse.out, sparse.lse!, dense.out, dense.lse!]) t.dispose();
  });

  // Scores with many ties; all equal; or signed, with both zeros and both infinities.
  const scoreKinds: Record<string, (i: number, random: () => number) => number> = {
    ties: (i, random) => (i % 5 === 0 ? 1 : Math.round(normal(1, random)[0]! * 100) / 10),
    equal: () => 3.5,
    signed: (_, random) => [0, -0, -Infinity, Infinity][Math.floor(random() * 8)] ?? normal(1, random)[0]! * 1000,
  };
  for (const [kind, score] of Object.entries(scoreKinds)) {
    // The 12000-page row is too long to stage in shared memory; the second table stages every row.
    for (const lengths of [[3, 2048, 8192, 5000, 1, 12000], [2, 700, 8192, 1, 300]]) {
      it(`selects the same pages as the CPU sort (${kind} scores, longest row ${Math.max(...lengths)} pages)`, async () => {
        const random = rng(600);
        const kvHeads = 8;
        const cache = pagedCache(lengths, 1, 1, 1, random, 0);
        const scores = new Float32Array(cache.indices.length * kvHeads);
        for (let i = 0; i < scores.length; i++) scores[i] = score(i, random);
        using sc = Tensor.fromArray(scores, [cache.indices.length, kvHeads]);
        using sg = sc.to(device);
        using tableC = new ops.StagedPageTable(cache, 'cpu');
        using tableG = new ops.StagedPageTable(cache, device);
        for (const budget of [1, 2, 3, 64, 299, 1024, 4096, 8191, 9000, 11000]) {
          using c = ops.topkPages(sc, tableC, budget);
          using g = ops.topkPages(sg, tableG, budget);
          const [ac, ag] = [await c.toArrays(), await g.toArrays()];
          expect([...ag.indptr]).toEqual([...ac.indptr]);
          expect(Buffer.from(ag.indices.buffer).equals(Buffer.from(ac.indices.buffer)), `budget ${budget}`).toBe(true);
          expect([...ag.lastPageLen]).toEqual([...ac.lastPageLen]);
        }
      });
    }
  }

  // Integer-valued keys and quarter-integer queries make every bound exact on both sides, so the GPU
  // keeps exactly the CPU's pages, ties included; the outputs then differ by rounding only.
  const decodeCases = [
    { name: 'GQA 4, D=128, a one-page and a partial last page', heads: 32, kvHeads: 8, dim: 128, pageSize: 16, lengths: [1, 17, 300, 4001], dtype: 'bf16' },
    { name: 'GQA 1, D=64, whole pages', heads: 8, kvHeads: 8, dim: 64, pageSize: 16, lengths: [16, 5000], dtype: 'bf16' },
    { name: 'GQA 16, D=256', heads: 32, kvHeads: 2, dim: 256, pageSize: 16, lengths: [700, 33], dtype: 'bf16' },
    { name: 'GQA 3, one-token pages', heads: 6, kvHeads: 2, dim: 128, pageSize: 1, lengths: [1, 900], dtype: 'bf16' },
    { name: 'GQA 2, f16, 32-token pages', heads: 8, kvHeads: 4, dim: 128, pageSize: 32, lengths: [3000, 5], dtype: 'f16' },
    { name: 'GQA 32 (the three ops)', heads: 64, kvHeads: 2, dim: 64, pageSize: 16, lengths: [2000, 40], dtype: 'bf16' },
  ] as const;
  for (const c of decodeCases) {
    it(`decodes in one op as the CPU reference does (${c.name})`, async () => {
      const random = rng(800 + c.dim + c.heads);
      const cache = pagedCache(c.lengths, c.pageSize, c.kvHeads, c.dim, random);
      const keys = cache.kPages.map((x) => Math.round(2 * x));
      const queries = normal(c.lengths.length * c.heads * c.dim, random).map((x) => Math.round(2 * x) / 4);
      using inputs = decodeInputs(cache, keys, queries, c.heads, c.kvHeads, c.dim, c.dtype);
      const { gpu: g, cpu: h } = inputs;
      for (const budget of [1, 2, 3, 7, 64, 1000]) {
        const cpu = ops.questDecodeAttention(h.q, h.pages, h.meta, h.table, budget, { returnLse: true });
        const [co, cl] = [(await cpu.out.toArray()) as Float32Array, (await cpu.lse!.toArray()) as Float32Array];
        for (const splits of [0, 1, 3]) {
          const gpu = ops.questDecodeAttention(g.q, g.pages, g.meta, g.table, budget, { returnLse: true, splits });
          expect(maxAbsDiff((await gpu.out.toArray()) as Float32Array, co), `budget ${budget} splits ${splits}`).toBeLessThan(2e-2);
          expect(maxAbsDiff((await gpu.lse!.toArray()) as Float32Array, cl), `budget ${budget} splits ${splits}`).toBeLessThan(2e-3);
          gpu.out.dispose();
          gpu.lse!.dispose();
        }
        cpu.out.dispose();
        cpu.lse!.dispose();
      }
    });
  }

  // Every physical page's keys copy one of 24 pages, so each bound is tied with its copies (as in
  // duplicated prompts): the threshold often falls inside a bin of equal keys, which the selection
  // settles without ranking, taking the earliest copies in page order as the CPU's stable sort does.
  // The values differ between copies, so taking a different copy would change the output.
  it('decodes in one op as the CPU reference does when pages repeat (bounds tied 8 to 64 ways)', async () => {
    const random = rng(1234);
    const [heads, kvHeads, dim, pageSize, distinct] = [16, 4, 128, 16, 24];
    const lengths = [3000, 24000, 190];
    const cache = pagedCache(lengths, pageSize, kvHeads, dim, random);
    const pageElems = pageSize * kvHeads * dim;
    const keys = new Float32Array(cache.kPages.length);
    for (let page = 0; page < cache.numPages; page++) {
      const from = (page % distinct) * pageElems;
      for (let i = 0; i < pageElems; i++) keys[page * pageElems + i] = Math.round(2 * cache.kPages[from + i]!);
    }
    const queries = normal(lengths.length * heads * dim, random).map((x) => Math.round(2 * x) / 4);
    using inputs = decodeInputs(cache, keys, queries, heads, kvHeads, dim, 'bf16');
    const { gpu: g, cpu: h } = inputs;
    for (const budget of [2, 5, 13, 64, 128, 300]) {
      using cpu = ops.questDecodeAttention(h.q, h.pages, h.meta, h.table, budget).out;
      using gpu = ops.questDecodeAttention(g.q, g.pages, g.meta, g.table, budget).out;
      const co = (await cpu.toArray()) as Float32Array;
      expect(maxAbsDiff((await gpu.toArray()) as Float32Array, co), `budget ${budget}`).toBeLessThan(2e-2);
    }
  });

  for (const [format, dim] of [['int4', 128], ['int8', 64]] as const) {
    it(`over a quantized layer (${format}, D=${dim}): metadata, scores and sparse decode match the reference`, async () => {
      const random = rng(950 + dim);
      const [heads, kvHeads, pageSize, budget] = [16, 4, 16, 6];
      const lens = [1, 40, 700, 2000];
      const cache = pagedCache(lens, pageSize, kvHeads, dim, random);
      const gpu = quantizedCache(lens, pageSize, kvHeads, dim, random, { format, dtype: 'bf16', device }, cache);
      const cpu = quantizedCache(lens, pageSize, kvHeads, dim, random, { format, dtype: 'bf16', device: 'cpu' }, cache);
      const shape = [cache.numPages, pageSize, kvHeads, dim];
      const all = Int32Array.from({ length: cache.numPages }, (_, i) => i);
      const metas = [];
      for (const [layer, dev] of [[gpu, device], [cpu, 'cpu']] as const) {
        using kPool = Tensor.fromArray(cache.kPages, shape, { dtype: 'bf16', device: dev });
        using vPool = Tensor.fromArray(cache.vPages, shape, { dtype: 'bf16', device: dev });
        const meta = ops.createQuestMeta(layer.quant, { dtype: 'bf16' });
        ops.quantizePages({ kSrc: kPool, vSrc: vPool, srcPages: all, dstPages: all, questMeta: meta }, layer.quant);
        metas.push(meta);
      }
      using meta = metas[0]!;
      using metaC = metas[1]!;
      expect(Buffer.from(await meta.bytes()).equals(Buffer.from(await metaC.bytes()))).toBe(true);

      const qData = normal(lens.length * heads * dim, random);
      using q = Tensor.fromArray(qData, [lens.length, heads, dim], { dtype: 'bf16', device });
      using qc = Tensor.fromArray(qData, [lens.length, heads, dim], { dtype: 'bf16' });
      using scores = ops.questScores(q, gpu.quant, meta, gpu.table);
      using scoresC = ops.questScores(qc, cpu.quant, metaC, cpu.table);
      const [sg, sc] = [(await scores.toArray()) as Float32Array, (await scoresC.toArray()) as Float32Array];
      const finite = sc.filter(Number.isFinite);
      expect(sg.map((x, i) => (Number.isFinite(x) ? 0 : i))).toEqual(sc.map((x, i) => (Number.isFinite(x) ? 0 : i)));
      expect(maxAbsDiff(sg.filter(Number.isFinite), finite)).toBeLessThan(1e-3 * Math.max(...finite.map(Math.abs)));

      // One selection for both (the GPU's scores), then the sparse decode over the quantized pages.
      using scoresBack = Tensor.fromArray(sg, [sg.length / kvHeads, kvHeads]);
      using selected = ops.topkPages(scores, gpu.table, budget);
      using selectedC = ops.topkPages(scoresBack, cpu.table, budget);
      expect(await selected.toArrays()).toEqual(await selectedC.toArrays());
      const got = ops.quantizedPagedDecodeAttention(q, gpu.quant, gpu, selected, { returnLse: true });
      const want = ops.quantizedPagedDecodeAttention(qc, cpu.quant, cpu, selectedC, { returnLse: true });
      expect(maxAbsDiff((await got.out.toArray()) as Float32Array, (await want.out.toArray()) as Float32Array)).toBeLessThan(2e-2);
      expect(maxAbsDiff((await got.lse!.toArray()) as Float32Array, (await want.lse!.toArray()) as Float32Array)).toBeLessThan(1e-3);
      for (const t of [got.out, got.lse, want.out, want.lse]) t?.dispose();
      gpu.dispose();
      cpu.dispose();
    });
  }

  it('decodes in one op as the three GPU ops do (Gaussian keys, 32K tokens)', async () => {
    const random = rng(900);
    const [heads, kvHeads, dim, pageSize] = [32, 8, 128, 16];
    const lengths = [32768];
    const cache = pagedCache(lengths, pageSize, kvHeads, dim, random);
    const shape = [cache.numPages, pageSize, kvHeads, dim];
    using kPages = Tensor.fromArray(cache.kPages, shape, { dtype: 'bf16', device });
    using vPages = Tensor.fromArray(cache.vPages, shape, { dtype: 'bf16', device });
    using q = Tensor.fromArray(normal(heads * dim, random), [1, heads, dim], { dtype: 'bf16', device });
    using meta = ops.createQuestMeta(kPages);
    using table = new ops.StagedPageTable(cache, device);
    ops.buildQuestMeta(kPages, meta, table);
    using scores = ops.questScores(q, kPages, meta, table);
    for (const budget of [64, 128, 256, 3000]) {
      // The fused kernel bounds pages exactly as questScores does, so both keep the same pages.
      using selected = ops.topkPages(scores, table, budget);
      const steps = ops.pagedDecodeAttention(q, { kPages, vPages }, selected, { returnLse: true });
      const one = ops.questDecodeAttention(q, { kPages, vPages }, meta, table, budget, { returnLse: true });
      expect(maxAbsDiff((await one.out.toArray()) as Float32Array, (await steps.out.toArray()) as Float32Array), `budget ${budget}`).toBeLessThan(1e-2);
      expect(maxAbsDiff((await one.lse!.toArray()) as Float32Array, (await steps.lse!.toArray()) as Float32Array), `budget ${budget}`).toBeLessThan(1e-3);
      for (const t of [steps.out, steps.lse!, one.out, one.lse!]) t.dispose();
    }
  });
});
