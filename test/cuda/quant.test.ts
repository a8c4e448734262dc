// GPU suite for the quantized KV cache: quantize and dequantize kernels byte for byte against the CPU
// reference, and the fused quantized decode and prefill against the CPU references (which dequantize
// first) within bf16/f16 rounding, over formats, head dims, page sizes, GQA ratios, split counts and
// masks; the GPU-only input checks.
import { describe, expect, it } from 'vitest';

import { ops, Tensor } from '../../lib/index';
import type { QuantizedKVPages } from '../../lib/index';
import { maxAbsDiff, normal, offsets, pagedCache, rng } from '../attention-fixtures';
import { codeOf } from '../cache/fixtures';
import { FORMATS, quantizedCache } from '../quant-fixtures';

const device = 'cuda:0' as const;

async function bytesOf(q: QuantizedKVPages): Promise<Uint8Array[]> {
  const out: Uint8Array[] = [];
  for (const t of [q.kCodes, q.vCodes, q.kScale, q.kMin, q.vScale, q.vMin]) if (t) out.push(await t.bytes());
  return out;
}

describe('quantizePages / dequantizePages on CUDA', () => {
  let seed = 500;
  for (const format of FORMATS) {
    for (const dim of [64, 128, 256]) {
      const groupSize = format === 'fp8e4m3' ? 32 : dim === 64 ? 64 : dim === 128 ? 32 : 128;
      it(`${format} D=${dim} G=${groupSize}: the same bytes as the CPU reference, also with NaN and infinities`, async () => {
        const random = rng(seed++);
        const [numPages, P, H] = [5, 16, 2];
        const data = [normal(numPages * P * H * dim, random), normal(numPages * P * H * dim, random)];
        data[0]![7] = NaN;
        data[0]![1000] = Infinity;
        data[1]![33] = -Infinity;
        data[1]![2000] = 1e6;
        const shape = [numPages, P, H, dim];
        const srcPages = [4, 0, 2], dstPages = [1, 3, 0];
        const results: Uint8Array[][] = [];
        const recon: Float32Array[][] = [];
        for (const dev of ['cpu', device] as const) {
          using kSrc = Tensor.fromArray(data[0]!, shape, { dtype: 'bf16', device: dev });
          using vSrc = Tensor.fromArray(data[1]!, shape, { dtype: 'bf16', device: dev });
          const q = ops.createQuantizedPages(4, P, H, dim, { format, groupSize, device: dev });
          for (const t of [q.kCodes, q.vCodes, q.kScale, q.kMin, q.vScale, q.vMin]) t?.fill(0);
          ops.quantizePages({ kSrc, vSrc, srcPages, dstPages }, q);
          results.push(await bytesOf(q));
          const deq = ops.dequantizePages(q, [0, 1, 3], 'f32');
          recon.push([(await deq.k.toArray()) as Float32Array, (await deq.v.toArray()) as Float32Array]);
          deq.k.dispose();
          deq.v.dispose();
          ops.disposeQuantizedPages(q);
        }
        results[0]!.forEach((cpu, i) => expect(results[1]![i], `tensor ${i}`).toEqual(cpu));
        expect(recon[1]![0]).toEqual(recon[0]![0]);
        expect(recon[1]![1]).toEqual(recon[0]![1]);
        for (const x of recon[1]![0]!) expect(Number.isFinite(x)).toBe(true);
      });
    }
  }
});

// The CUDA decode against the CPU reference over the same dtype-rounded inputs (so the CPU's quantized
// pages are the GPU's byte for byte).
async function expectDecodeMatches(lens: number[], pageSize: number, kvHeads: number, heads: number, dim: number, random: () => number,
                                   opts: { format: QuantizedKVPages['format']; groupSize: number; dtype: 'bf16' | 'f16' }) {
  const cache = pagedCache(lens, pageSize, kvHeads, dim, random);
  const gpu = quantizedCache(lens, pageSize, kvHeads, dim, random, { ...opts, device }, cache);
  const cpu = quantizedCache(lens, pageSize, kvHeads, dim, random, { ...opts, device: 'cpu' }, cache);
  const qData = normal(lens.length * heads * dim, random);
  using q = Tensor.fromArray(qData, [lens.length, heads, dim], { dtype: opts.dtype, device });
  using qc = Tensor.fromArray(qData, [lens.length, heads, dim], { dtype: opts.dtype });
  const got = ops.quantizedPagedDecodeAttention(q, gpu.quant, gpu, gpu.table, { returnLse: true });
  const want = ops.quantizedPagedDecodeAttention(qc, cpu.quant, cpu, cpu.table, { returnLse: true });
  expect(maxAbsDiff((await got.out.toArray()) as Float32Array, (await want.out.toArray()) as Float32Array), 'out').toBeLessThan(2e-2);
  expect(maxAbsDiff((await got.lse!.toArray()) as Float32Array, (await want.lse!.toArray()) as Float32Array), 'lse').toBeLessThan(1e-3);
  for (const t of [got.out, got.lse, want.out, want.lse]) t?.dispose();
  gpu.dispose();
  cpu.dispose();
}

describe('quantizedPagedDecodeAttention on CUDA', () => {
  const layouts = [
    { pageSize: 1, lens: [1, 5, 33] },
    { pageSize: 16, lens: [1, 16, 17, 300, 3000] },
    { pageSize: 64, lens: [64, 65, 700] },
    { pageSize: 256, lens: [3, 256, 2000] },
  ];
  let seed = 700;
  for (const format of FORMATS) {
    for (const [li, { pageSize, lens }] of layouts.entries()) {
      for (const dim of [64, 128, 256]) {
        const ratio = [1, 4, 8, 16][(li + dim / 64) % 4]!;
        const dtype = (li + dim) % 2 ? 'f16' : 'bf16';
        const groupSize = format === 'fp8e4m3' ? 32 : [32, 64][li % 2]!;
        it(`${format} P=${pageSize} D=${dim} H/Hkv=${ratio} ${dtype} G=${groupSize}: matches the CPU reference`, async () => {
          await expectDecodeMatches(lens, pageSize, 2, 2 * ratio, dim, rng(seed++), { format, groupSize, dtype });
        });
      }
    }
  }
  // Groups past one block's head tiles (8 heads, or 16 up to D = 128) take several blocks per KV
  // head, the last one partial; 3000 tokens of a batch of 4 split.
  for (const [gi, group] of [12, 24, 40].entries()) {
    const format = FORMATS[gi % FORMATS.length]!;
    const dim = [64, 128, 256][gi]!;
    it(`${format} P=16 D=${dim} H/Hkv=${group} (several head blocks per KV head): matches the CPU reference`, async () => {
      await expectDecodeMatches([1, 17, 300, 3000], 16, 2, 2 * group, dim, rng(seed++), { format, groupSize: 32, dtype: 'bf16' });
    });
  }
  // A batch whose B x Hkv fills two blocks per SM (up to 160 SMs) takes two KV heads per int4 block.
  for (const dtype of ['bf16', 'f16'] as const) {
    it(`int4 P=16 D=128 H/Hkv=32/8 ${dtype} with B x Hkv = 320 (two KV heads a block): matches the CPU reference`, async () => {
      const random = rng(seed++);
      const lens = Array.from({ length: 40 }, () => 1 + Math.floor(random() * 90));
      await expectDecodeMatches(lens, 16, 8, 32, 128, random, { format: 'int4', groupSize: 32, dtype });
    });
  }
});

describe('quantizedPagedDecodeAttention over a per-KV-head selection on CUDA', () => {
  // Both kernels (page 16: tensor cores, page 4: CUDA cores), every format; the GPU selects the pages.
  const cases = [
    ['fp8e4m3', 16, 128, 8, 'bf16'], ['int8', 16, 64, 4, 'f16'], ['int4', 16, 128, 16, 'bf16'], ['int2', 16, 256, 4, 'bf16'],
    ['int4', 4, 128, 8, 'f16'],
  ] as const;
  let seed = 780;
  for (const [format, pageSize, dim, group, dtype] of cases) {
    it(`${format} P=${pageSize} D=${dim} H/Hkv=${group} ${dtype}: matches the CPU reference`, async () => {
      const random = rng(seed++);
      const kvHeads = 4, heads = kvHeads * group;
      const lens = [1, 17, 700, 3000];
      const cache = pagedCache(lens, pageSize, kvHeads, dim, random);
      const gpu = quantizedCache(lens, pageSize, kvHeads, dim, random, { format, groupSize: 32, dtype, device }, cache);
      const cpu = quantizedCache(lens, pageSize, kvHeads, dim, random, { format, groupSize: 32, dtype, device: 'cpu' }, cache);
      const qData = normal(lens.length * heads * dim, random);
      using q = Tensor.fromArray(qData, [lens.length, heads, dim], { dtype, device });
      using qc = Tensor.fromArray(qData, [lens.length, heads, dim], { dtype });
      const scoreData = normal(cache.indices.length * kvHeads, random);
      using scores = Tensor.fromArray(scoreData, [cache.indices.length, kvHeads], { device });
      using scoresC = Tensor.fromArray(scoreData, [cache.indices.length, kvHeads]);
      for (const budget of [5, 60]) {
        using selected = ops.topkPages(scores, gpu.table, budget);
        using selectedC = ops.topkPages(scoresC, cpu.table, budget);
        const got = ops.quantizedPagedDecodeAttention(q, gpu.quant, gpu, selected, { returnLse: true });
        const want = ops.quantizedPagedDecodeAttention(qc, cpu.quant, cpu, selectedC, { returnLse: true });
        expect(maxAbsDiff((await got.out.toArray()) as Float32Array, (await want.out.toArray()) as Float32Array), `out, budget ${budget}`).toBeLessThan(2e-2);
        expect(maxAbsDiff((await got.lse!.toArray()) as Float32Array, (await want.lse!.toArray()) as Float32Array), `lse, budget ${budget}`).toBeLessThan(1e-3);
        for (const t of [got.out, got.lse, want.out, want.lse]) t?.dispose();
      }
      gpu.dispose();
      cpu.dispose();
    });
  }
});

describe('quantizedPagedPrefillAttention on CUDA', () => {
  // Several K/V tiles and query tiles per sequence, tails partial and full, one-page sequences, Sq < Sk.
  const layouts = [
    { pageSize: 1, lens: [1, 5, 33], qLens: [1, 5, 9] },
    { pageSize: 16, lens: [1, 16, 17, 300], qLens: [1, 16, 3, 77] },
    { pageSize: 64, lens: [64, 65, 300], qLens: [64, 1, 129] },
    { pageSize: 256, lens: [3, 256, 700], qLens: [3, 100, 65] },
  ];
  const masks = [
    { causal: true, windowLeft: -1 },
    { causal: true, windowLeft: 40 },
    { causal: false, windowLeft: -1 },
  ];
  let seed = 900;
  for (const [fi, format] of FORMATS.entries()) {
    for (const [li, { pageSize, lens, qLens }] of layouts.entries()) {
      for (const dim of [64, 128, 256]) {
        const ratio = [1, 4, 8, 16][(li + dim / 64 + fi) % 4]!;
        const dtype = (li + dim / 64 + fi) % 2 ? 'f16' : 'bf16';
        const groupSize = format === 'fp8e4m3' ? 32 : [32, 64][(li + fi) % 2]!;
        const mask = masks[(li + dim / 64 + fi) % 3]!;
        it(`${format} P=${pageSize} D=${dim} H/Hkv=${ratio} ${dtype} G=${groupSize} causal=${mask.causal} window=${mask.windowLeft}: matches the CPU reference`, async () => {
          const random = rng(seed++);
          const kvHeads = 2, heads = kvHeads * ratio;
          const cache = pagedCache(lens, pageSize, kvHeads, dim, random);
          const gpu = quantizedCache(lens, pageSize, kvHeads, dim, random, { format, groupSize, dtype, device }, cache);
          const cpu = quantizedCache(lens, pageSize, kvHeads, dim, random, { format, groupSize, dtype, device: 'cpu' }, cache);
          const cuSeqlensQ = offsets(qLens);
          const nq = cuSeqlensQ.at(-1)!;
          const qData = normal(nq * heads * dim, random);
          using q = Tensor.fromArray(qData, [nq, heads, dim], { dtype, device });
          using qc = Tensor.fromArray(qData, [nq, heads, dim], { dtype });
          const opts = { cuSeqlensQ, ...mask, returnLse: true };
          const got = ops.quantizedPagedPrefillAttention(q, gpu.quant, gpu, gpu.table, opts);
          const want = ops.quantizedPagedPrefillAttention(qc, cpu.quant, cpu, cpu.table, opts);
          expect(maxAbsDiff((await got.out.toArray()) as Float32Array, (await want.out.toArray()) as Float32Array), 'out').toBeLessThan(2e-2);
          expect(maxAbsDiff((await got.lse!.toArray()) as Float32Array, (await want.lse!.toArray()) as Float32Array), 'lse').toBeLessThan(1e-3);
          for (const t of [got.out, got.lse, want.out, want.lse]) t?.dispose();
          gpu.dispose();
          cpu.dispose();
        });
      }
    }
  }

  it('refuses f32, unsupported head dims and mixed devices', () => {
    const random = rng(950);
    const qc = quantizedCache([5, 9], 4, 2, 64, random, { format: 'int4', dtype: 'bf16', device });
    const opts = { cuSeqlensQ: [0, 2, 6] };
    using q = Tensor.zeros([6, 4, 64], { dtype: 'bf16', device });
    expect(codeOf(() => ops.quantizedPagedPrefillAttention(q, qc.quant, qc, qc.table, opts).out.dispose())).toBeUndefined();
    using q32 = Tensor.zeros([6, 4, 64], { device });
    expect(codeOf(() => ops.quantizedPagedPrefillAttention(q32, qc.quant, qc, qc.table, opts))).toBe('E_DTYPE');
    using qHost = Tensor.zeros([6, 4, 64], { dtype: 'bf16' });
    expect(codeOf(() => ops.quantizedPagedPrefillAttention(qHost, qc.quant, qc, qc.table, opts))).toBe('E_DEVICE');
    const wide = ops.createQuantizedPages(4, 4, 2, 96, { format: 'int8', device });
    using q96 = Tensor.zeros([6, 4, 96], { dtype: 'bf16', device });
    using tail96 = Tensor.zeros([4, 4, 2, 96], { dtype: 'bf16', device });
    expect(codeOf(() => ops.quantizedPagedPrefillAttention(q96, wide, { kTail: tail96, vTail: tail96 }, qc.table, opts))).toBe('E_UNSUPPORTED');
    ops.disposeQuantizedPages(wide);
    qc.dispose();
  });
});
