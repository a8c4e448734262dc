// SnapKV end to end: the observation window's own attention (ops.attentionMass per token over the
// window's prefill lse) chooses each KV head's pages.
import { describe, expect, it } from 'vitest';

import { ops, PagedKVCache, SnapKV, Tensor } from '../../lib/index';
import { normal, rng } from '../attention-fixtures';

describe('SnapKV with scores from the observation window', () => {
  it('keeps, for each KV head, the page its window queries attend to', async () => {
    const [kvHeads, heads, dim, pageSize, promptLength, window] = [2, 4, 16, 4, 32, 4];
    using cache = new PagedKVCache({ layers: 1, numPages: 16, pageSize, kvHeads, headDim: dim, dtype: 'f32', policy: new SnapKV({ windowPages: 1, capacityPages: 1, kernelSize: 1 }) });
    const seq = cache.addSequence();
    const random = rng(91);
    // Each KV head has a direction its query heads look along, and one prompt token whose key lies along it.
    const directions = [normal(dim, random), normal(dim, random)];
    const planted = [5, 13]; // token positions, in pages 1 and 3
    const keys = normal(promptLength * kvHeads * dim, random).map((x) => x * 0.3);
    planted.forEach((position, h) => keys.set(directions[h]!.map((x) => x * 3), (position * kvHeads + h) * dim));
    using k = Tensor.fromArray(keys, [promptLength, kvHeads, dim]);
    using v = Tensor.fromArray(normal(promptLength * kvHeads * dim, random), [promptLength, kvHeads, dim]);
    cache.append(seq, 0, k, v);
    // The last `window` prompt tokens' queries, each query head along its KV head's direction.
    const qData = new Float32Array(window * heads * dim);
    for (let i = 0; i < window; i++) for (let g = 0; g < heads; g++) qData.set(directions[Math.floor(g / (heads / kvHeads))]!, (i * heads + g) * dim);
    using q = Tensor.fromArray(qData, [window, heads, dim]);
    using table = cache.stagePageTable([seq]);
    const cuSeqlensQ = [0, window];
    const { out, lse } = ops.pagedPrefillAttention(q, cache.pages(0), table, { cuSeqlensQ, returnLse: true });
    using mass = ops.attentionMass(q, cache.pages(0).kPages, table, lse!, { cuSeqlensQ, per: 'token' });
    const perToken = (await mass.toArray()) as Float32Array;
    const scores = [0, 1].map((h) => Float32Array.from({ length: promptLength }, (_, t) => perToken[t * kvHeads + h]!));
    const before = cache.info(seq).pages;
    const { headPages } = cache.compress(seq, scores);
    expect([...headPages[0]!]).toEqual([before[1], before[7]]); // head 0: page of token 5, and the window
    expect([...headPages[1]!]).toEqual([before[3], before[7]]); // head 1: page of token 13, and the window
    expect([...cache.info(seq).pageStarts]).toEqual([4, 12, 28]);
    out.dispose();
    lse!.dispose();
  });
});
