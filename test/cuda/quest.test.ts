// GPU suite: Quest kernels against the CPU reference.
import { describe, expect, it } from 'vitest';

import { ops, Tensor } from '../../lib/index';
import { maxAbsDiff, normal, pagedCache, rng } from '../attention-fixtures';

const device = 'cuda:0' as const;

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
});
