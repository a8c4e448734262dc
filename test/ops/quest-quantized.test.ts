// Quest over a quantized layer (CPU reference): metadata recorded by quantizePages from the keys
// before quantization, scores over the quantized pages (tail pages +Infinity), and the sparse decode
// over the selection, each against the same step over full-precision or dequantized pages.
import { describe, expect, it } from 'vitest';
import { KvflashError, ops, Tensor } from '../../lib/index';
import { normal, rng } from '../attention-fixtures';
import { expectSelectedDecodeMatches, quantizedCache } from '../quant-fixtures';

function expectCode(f: () => unknown, code: string): void {
  expect(f).toThrow(KvflashError);
  expect(f).toThrow(expect.objectContaining({ code }));
}

describe('Quest metadata of quantized pages (CPU reference)', () => {
  for (const dtype of ['f32', 'bf16'] as const) {
    it(`quantizePages records each page's min and max keys, as buildQuestMeta does over the source (${dtype})`, async () => {
      const random = rng(60);
      const [numSrc, pageSize, kvHeads, dim] = [7, 4, 2, 64];
      const shape = [numSrc, pageSize, kvHeads, dim];
      using kSrc = Tensor.fromArray(normal(numSrc * pageSize * kvHeads * dim, random), shape, { dtype });
      using vSrc = Tensor.fromArray(normal(numSrc * pageSize * kvHeads * dim, random), shape, { dtype });
      using metaSrc = ops.createQuestMeta(kSrc);
      const all = Int32Array.from({ length: numSrc }, (_, i) => i);
      ops.buildQuestMeta(kSrc, metaSrc, { indptr: [0, numSrc], indices: all, lastPageLen: [pageSize] });
      const quant = ops.createQuantizedPages(9, pageSize, kvHeads, dim, { format: 'int4' });
      using meta = ops.createQuestMeta(quant, { dtype });
      expect(meta.shape).toEqual([9, 2, kvHeads, dim]);
      const srcPages = [5, 0, 3, 6], dstPages = [2, 8, 0, 4];
      ops.quantizePages({ kSrc, vSrc, srcPages, dstPages, questMeta: meta }, quant);
      const row = 2 * kvHeads * dim; // elements of one page's metadata
      const [got, want] = [(await meta.toArray()) as Float32Array, (await metaSrc.toArray()) as Float32Array];
      srcPages.forEach((src, i) => expect(got.subarray(dstPages[i]! * row, (dstPages[i]! + 1) * row)).toEqual(want.subarray(src * row, (src + 1) * row)));

      using wrongShape = ops.createQuestMeta(kSrc);
      expectCode(() => ops.quantizePages({ kSrc, vSrc, srcPages, dstPages, questMeta: wrongShape }, quant), 'E_SHAPE');
      using wrongDtype = Tensor.zeros([9, 2, kvHeads, dim], { dtype: dtype === 'f32' ? 'bf16' : 'f32' });
      expectCode(() => ops.quantizePages({ kSrc, vSrc, srcPages, dstPages, questMeta: wrongDtype }, quant), 'E_DTYPE');
      expectCode(() => ops.createQuestMeta(quant, {} as never), 'E_DTYPE');
      ops.disposeQuantizedPages(quant);
    });
  }
});

describe('Quest over a quantized layer (CPU reference)', () => {
  for (const [format, pageSize, budget] of [['int8', 4, 3], ['int2', 16, 4], ['fp8e4m3', 4, 2]] as const) {
    it(`${format} P=${pageSize} budget ${budget}: scores, selection and sparse decode match full precision`, async () => {
      const random = rng(61 + pageSize + budget);
      const [heads, kvHeads, dim] = [8, 2, 64];
      const lens = [1, pageSize + 2, 9 * pageSize - 1, 4 * pageSize];
      const qc = quantizedCache(lens, pageSize, kvHeads, dim, random, { format, dtype: 'f32', device: 'cpu' });
      const shape = [qc.cache.numPages, pageSize, kvHeads, dim];
      using kPool = Tensor.fromArray(qc.cache.kPages, shape);
      using vPool = Tensor.fromArray(qc.cache.vPages, shape);
      // The layer's pages again, now with their metadata (the same codes: quantizing is deterministic).
      using meta = ops.createQuestMeta(qc.quant, { dtype: 'f32' });
      const all = Int32Array.from({ length: qc.cache.numPages }, (_, i) => i);
      ops.quantizePages({ kSrc: kPool, vSrc: vPool, srcPages: all, dstPages: all, questMeta: meta }, qc.quant);
      using metaFull = ops.createQuestMeta(kPool);
      ops.buildQuestMeta(kPool, metaFull, qc.cache);
      using q = Tensor.fromArray(normal(lens.length * heads * dim, random), [lens.length, heads, dim]);

      using scores = ops.questScores(q, qc.quant, meta, qc.table);
      using scoresFull = ops.questScores(q, kPool, metaFull, qc.cache);
      const [s, sf] = [(await scores.toArray()) as Float32Array, (await scoresFull.toArray()) as Float32Array];
      const isLast = (e: number) => qc.cache.indptr.includes(e + 1);
      for (let e = 0; e < qc.cache.indices.length; e++) {
        for (let h = 0; h < kvHeads; h++) expect(s[e * kvHeads + h]).toBe(isLast(e) ? Infinity : sf[e * kvHeads + h]);
      }

      // The tail pages' scores do not matter: the same pages are kept as over full precision.
      using selected = ops.topkPages(scores, qc.table, budget);
      using selectedFull = ops.topkPages(scoresFull, qc.table, budget);
      expect(await selected.toArrays()).toEqual(await selectedFull.toArrays());

      (await expectSelectedDecodeMatches(q, qc, scores, budget)).dispose();

      // Metadata that does not cover the table's quantized pages is refused.
      using short = Tensor.zeros([2, 2, kvHeads, dim]);
      expectCode(() => ops.questScores(q, qc.quant, short, qc.table), 'E_RANGE');
      qc.dispose();
    });
  }
});
