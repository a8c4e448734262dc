// A cache made with quest: true keeps every layer's Quest metadata equal, bit for bit, to metadata
// built in one pass over its pages, through single appends, batched steps and copy-on-write forks.
import { describe, expect, it } from 'vitest';

import { ops, PagedKVCache, Tensor } from '../../lib/index';
import { normal, rng } from '../attention-fixtures';

describe('PagedKVCache with quest: true', () => {
  it('keeps metadata current through appends, steps and forks', async () => {
    const [layers, kvHeads, dim, pageSize] = [2, 2, 8, 4];
    using cache = new PagedKVCache({ layers, numPages: 32, pageSize, kvHeads, headDim: dim, dtype: 'bf16', quest: true });
    const random = rng(55);
    const rows = (n: number) => Tensor.fromArray(normal(n * kvHeads * dim, random), [n, kvHeads, dim], { dtype: 'bf16' });
    const a = cache.addSequence();
    const b = cache.addSequence();
    for (const [seq, n] of [[a, 9], [b, 3]] as const) {
      for (let layer = 0; layer < layers; layer++) {
        using k = rows(n);
        cache.append(seq, layer, k, k);
      }
    }
    const c = cache.fork(a); // shares a's pages; the next write copies the partial last page
    for (let step = 0; step < 6; step++) {
      using s = cache.beginStep([{ seq: a, tokens: 1 }, { seq: b, tokens: 2 }, { seq: c, tokens: 1 }]);
      for (let layer = 0; layer < layers; layer++) {
        using k = rows(4);
        s.append(layer, k, k);
      }
    }
    const table = cache.pageTable([a, b, c]);
    for (let layer = 0; layer < layers; layer++) {
      using fresh = ops.createQuestMeta(cache.pages(layer).kPages);
      ops.buildQuestMeta(cache.pages(layer).kPages, fresh, table);
      const [kept, built] = [await cache.questMeta(layer).bytes(), await fresh.bytes()];
      const pageBytes = 2 * kvHeads * dim * 2;
      for (const page of new Set(table.indices)) {
        expect(Buffer.from(kept.subarray(page * pageBytes, (page + 1) * pageBytes)).equals(Buffer.from(built.subarray(page * pageBytes, (page + 1) * pageBytes))), `layer ${layer} page ${page}`).toBe(true);
      }
    }
  });
});
