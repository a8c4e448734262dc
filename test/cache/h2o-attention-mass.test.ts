// H2O end to end: the decode's own attention mass (ops.attentionMass over the step's lse) drives the
// eviction, and the page holding the token every query attends to survives while light pages go.
import { describe, expect, it } from 'vitest';

import { H2O, ops, PagedKVCache, Tensor } from '../../lib/index';
import { normal, rng } from '../attention-fixtures';

describe('H2O with attention mass from the decode', () => {
  it('keeps the heavy page and the recent page as the sequence outgrows its budget', async () => {
    const [kvHeads, heads, dim, pageSize] = [2, 4, 16, 4];
    using cache = new PagedKVCache({ layers: 1, numPages: 8, pageSize, kvHeads, headDim: dim, dtype: 'f32', policy: new H2O({ budgetPages: 4, recentPages: 1 }) });
    const seq = cache.addSequence();
    const random = rng(77);
    const direction = normal(dim, random);
    const heavyPosition = 1; // the oldest page: with no mass (or reversed mass) H2O drops it first
    for (let position = 0; position < 48; position++) {
      // Keys are noise except the heavy token's, which lies along the direction every query takes.
      const kData = normal(kvHeads * dim, random).map((x) => x * 0.3);
      if (position === heavyPosition) for (let h = 0; h < kvHeads; h++) kData.set(direction.map((x) => x * 3), h * dim);
      using k = Tensor.fromArray(kData, [1, kvHeads, dim]);
      using v = Tensor.fromArray(normal(kvHeads * dim, random), [1, kvHeads, dim]);
      cache.append(seq, 0, k, v);
      // Decode one query along the direction, then credit each page with the mass it received.
      const qData = new Float32Array(heads * dim);
      for (let g = 0; g < heads; g++) qData.set(direction, g * dim);
      using q = Tensor.fromArray(qData, [1, heads, dim]);
      using table = cache.stagePageTable([seq]);
      const { out, lse } = ops.pagedDecodeAttention(q, cache.pages(0), table, { returnLse: true });
      using mass = ops.attentionMass(q, cache.pages(0).kPages, table, lse!);
      const perHead = (await mass.toArray()) as Float32Array;
      const perPage = Array.from({ length: perHead.length / kvHeads }, (_, i) => perHead[i * kvHeads]! + perHead[i * kvHeads + 1]!);
      cache.recordAttentionMass(seq, perPage);
      out.dispose();
      lse!.dispose();
    }
    const { pageStarts } = cache.info(seq);
    expect(pageStarts.length).toBeLessThanOrEqual(4);
    expect([...pageStarts]).toContain(Math.floor(heavyPosition / pageSize) * pageSize);
    expect(pageStarts.at(-1)).toBe(44); // the recent page
    expect(cache.stats().evictedPages).toBeGreaterThan(0);
  });
});
