// A cache made with quest: true keeps every layer's Quest metadata equal, bit for bit, to metadata
// built in one pass over its pages, through single appends, batched steps and copy-on-write forks;
// a quantized one keeps its quantized pages' metadata from their keys before quantization.
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

  it('keeps a quantized cache\'s metadata from the keys before quantization, and runs Quest over it', async () => {
    const [layers, kvHeads, dim, pageSize, heads] = [2, 2, 32, 4, 4];
    using cache = new PagedKVCache({ layers, numPages: 32, pageSize, kvHeads, headDim: dim, dtype: 'f32', quant: { format: 'int4' }, quest: true });
    const random = rng(56);
    const keys = new Map<number, number[][]>(); // per sequence, per layer: the keys written, token-major
    const write = (seq: number, layer: number, n: number) => {
      const data = normal(n * kvHeads * dim, random);
      keys.get(seq)![layer]!.push(...data);
      return Tensor.fromArray(data, [n, kvHeads, dim]);
    };
    const a = cache.addSequence();
    const b = cache.addSequence();
    for (const seq of [a, b]) keys.set(seq, Array.from({ length: layers }, () => []));
    for (const [seq, n] of [[a, 9], [b, 3]] as const) {
      for (let layer = 0; layer < layers; layer++) {
        using k = write(seq, layer, n);
        cache.append(seq, layer, k, k);
      }
    }
    const c = cache.fork(a);
    keys.set(c, keys.get(a)!.map((rows) => [...rows]));
    for (let step = 0; step < 6; step++) {
      const plan = [{ seq: a, tokens: 1 }, { seq: b, tokens: 2 }, { seq: c, tokens: 1 }];
      using s = cache.beginStep(plan);
      for (let layer = 0; layer < layers; layer++) {
        const parts = plan.map(({ seq, tokens }) => write(seq, layer, tokens));
        using k = Tensor.fromArray(Float32Array.from((await Promise.all(parts.map((t) => t.toArray()))).flatMap((x) => [...(x as Float32Array)])), [4, kvHeads, dim]);
        parts.forEach((t) => t.dispose());
        s.append(layer, k, k);
      }
    }
    const seqs = [a, b, c];
    const table = cache.pageTable(seqs);
    const row = kvHeads * dim;
    for (let layer = 0; layer < layers; layer++) {
      const meta = (await cache.questMeta(layer).toArray()) as Float32Array;
      seqs.forEach((seq, i) => {
        const written = keys.get(seq)![layer]!;
        for (let e = table.indptr[i]!; e < table.indptr[i + 1]! - 1; e++) {
          const page = table.indices[e]!, first = (e - table.indptr[i]!) * pageSize;
          for (let x = 0; x < row; x++) {
            const column = Array.from({ length: pageSize }, (_, t) => written[(first + t) * row + x]!);
            expect(meta[page * 2 * row + x], `layer ${layer} seq ${seq} page ${page}`).toBe(Math.min(...column));
            expect(meta[(page * 2 + 1) * row + x]).toBe(Math.max(...column));
          }
        }
      });
    }

    // Quest through the cache: a budget that keeps every page is the dense decode.
    using q = Tensor.fromArray(normal(seqs.length * heads * dim, random), [seqs.length, heads, dim]);
    const [quant, tail] = [cache.quantizedPages(1), cache.tailPages(1)];
    using scores = ops.questScores(q, quant, cache.questMeta(1), table);
    using all = ops.topkPages(scores, table, 64);
    using few = ops.topkPages(scores, table, 2);
    const dense = ops.quantizedPagedDecodeAttention(q, quant, tail, table);
    const full = ops.quantizedPagedDecodeAttention(q, quant, tail, all);
    const sparse = ops.quantizedPagedDecodeAttention(q, quant, tail, few);
    expect(await full.out.toArray()).toEqual(await dense.out.toArray());
    expect(sparse.out.shape).toEqual(dense.out.shape);
    for (const t of [dense.out, full.out, sparse.out]) t.dispose();
  });
});
