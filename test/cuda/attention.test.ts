// GPU suite: every CUDA attention kernel against the CPU reference on random awkward shapes.
// Inputs are rounded to the GPU dtype first, so the reference (f32 arithmetic, f32 output) sees the
// same numbers; bf16/f16 outputs must land within 2e-2 absolute, lse within 1e-3.
import { describe, expect, it } from 'vitest';

import { KvflashError, ops, Tensor } from '../../lib/index';
import { maxAbsDiff, normal, offsets, pagedCache, rng } from '../attention-fixtures';

const device = 'cuda:0' as const;
type GpuDType = 'bf16' | 'f16';

/** The same values as a GPU tensor of `dtype` and as the exact f32 CPU tensor of the rounded values. */
async function pair(data: Float32Array, shape: number[], dtype: GpuDType): Promise<[Tensor, Tensor]> {
  const gpu = Tensor.fromArray(data, shape, { dtype, device });
  const rounded = (await gpu.toArray()) as Float32Array;
  return [gpu, Tensor.fromArray(rounded, shape)];
}

/** A random paged cache as GPU pages of `dtype` and as the exact f32 CPU pages of the rounded values. */
async function pagedPair(lens: number[], pageSize: number, kvHeads: number, dim: number, dtype: GpuDType, random: () => number) {
  const cache = pagedCache(lens, pageSize, kvHeads, dim, random);
  const poolShape = [cache.numPages, pageSize, kvHeads, dim];
  const [kPages, kPagesC] = await pair(cache.kPages, poolShape, dtype);
  const [vPages, vPagesC] = await pair(cache.vPages, poolShape, dtype);
  return { cache, gpuPages: { kPages, vPages }, cpuPages: { kPages: kPagesC, vPages: vPagesC }, pages: [kPages, vPages, kPagesC, vPagesC] };
}

function disposeAll(...tensors: (Tensor | undefined)[]): void {
  for (const t of tensors) t?.dispose();
}

async function expectClose(gpu: Tensor, cpu: Tensor, tolerance: number, what: string): Promise<void> {
  const diff = maxAbsDiff((await gpu.toArray()) as Float32Array, (await cpu.toArray()) as Float32Array);
  expect(diff, what).toBeLessThan(tolerance);
}

const GQA = [1, 2, 4, 8]; // H / Hkv with H = 8
const DIMS = [64, 128, 256];

describe('prefillAttention on CUDA', () => {
  const shapes = [
    { qLens: [1, 37, 130], kLens: [1, 87, 130], causal: true, windowLeft: -1 },
    { qLens: [64, 3], kLens: [200, 3], causal: true, windowLeft: 17 },
    { qLens: [5, 70], kLens: [129, 33], causal: false, windowLeft: -1 },
  ];
  let seed = 100;
  for (const dim of DIMS) {
    for (const ratio of GQA) {
      const shape = shapes[(dim + ratio) % shapes.length]!;
      const dtype: GpuDType = ratio % 2 ? 'f16' : 'bf16';
      it(`D=${dim} H/Hkv=${ratio} ${dtype} causal=${shape.causal} window=${shape.windowLeft}`, async () => {
        const random = rng(seed++);
        const heads = 8, kvHeads = 8 / ratio;
        const cuSeqlensQ = offsets(shape.qLens), cuSeqlensK = offsets(shape.kLens);
        const nq = cuSeqlensQ.at(-1)!, nk = cuSeqlensK.at(-1)!;
        const [q, qc] = await pair(normal(nq * heads * dim, random), [nq, heads, dim], dtype);
        const [k, kc] = await pair(normal(nk * kvHeads * dim, random), [nk, kvHeads, dim], dtype);
        const [v, vc] = await pair(normal(nk * kvHeads * dim, random), [nk, kvHeads, dim], dtype);
        const opts = { cuSeqlensQ, cuSeqlensK, causal: shape.causal, windowLeft: shape.windowLeft, returnLse: true };
        const gpu = ops.prefillAttention(q, k, v, opts);
        const cpu = ops.prefillAttention(qc, kc, vc, opts);
        await expectClose(gpu.out, cpu.out, 2e-2, 'out');
        await expectClose(gpu.lse!, cpu.lse!, 1e-3, 'lse');
        disposeAll(q, k, v, qc, kc, vc, gpu.out, gpu.lse, cpu.out, cpu.lse);
      });
    }
  }
});

// Head dim 128 runs its own kernel on Hopper (wgmma over 128-query x 128-key tiles, persistent
// blocks): sequences several tiles long with odd tails, queries fewer or more than keys, windows,
// and batches mixing lengths 1..300, across the GQA ratios and both dtypes.
describe('prefillAttention on CUDA, head dim 128 across tile boundaries', () => {
  const mixed = (random: () => number, n: number, extra: number) => {
    const qLens = Array.from({ length: n }, () => 1 + Math.floor(random() * 300));
    return { qLens, kLens: qLens.map((l) => l + Math.floor(random() * extra)) };
  };
  const shapes = [
    { name: 'causal, Sq <= Sk', qLens: [1000, 777, 129, 1, 255], kLens: [1000, 1500, 385, 1, 256], causal: true, windowLeft: -1 },
    { name: 'non-causal, Sq > Sk', qLens: [513, 300, 129, 1], kLens: [257, 1, 128, 700], causal: false, windowLeft: -1 },
    { name: 'causal window 200', qLens: [1111, 300], kLens: [1111, 900], causal: true, windowLeft: 200 },
    { name: 'causal, lengths 1..300', ...mixed(rng(7), 40, 300), causal: true, windowLeft: -1 },
    { name: 'non-causal window 90, lengths 1..300', ...mixed(rng(8), 40, 300), causal: false, windowLeft: 90 },
  ];
  const dim = 128, heads = 8;
  let seed = 200;
  shapes.forEach((shape, i) => {
    const ratio = GQA[i % GQA.length]!;
    const dtype: GpuDType = i % 2 ? 'f16' : 'bf16';
    const returnLse = i !== 2;
    it(`${shape.name}: H/Hkv=${ratio} ${dtype}${returnLse ? '' : ' without lse'}`, async () => {
      const random = rng(seed++);
      const kvHeads = heads / ratio;
      const cuSeqlensQ = offsets(shape.qLens), cuSeqlensK = offsets(shape.kLens);
      const nq = cuSeqlensQ.at(-1)!, nk = cuSeqlensK.at(-1)!;
      const [q, qc] = await pair(normal(nq * heads * dim, random), [nq, heads, dim], dtype);
      const [k, kc] = await pair(normal(nk * kvHeads * dim, random), [nk, kvHeads, dim], dtype);
      const [v, vc] = await pair(normal(nk * kvHeads * dim, random), [nk, kvHeads, dim], dtype);
      const opts = { cuSeqlensQ, cuSeqlensK, causal: shape.causal, windowLeft: shape.windowLeft, returnLse };
      const gpu = ops.prefillAttention(q, k, v, opts);
      const cpu = ops.prefillAttention(qc, kc, vc, opts);
      await expectClose(gpu.out, cpu.out, 2e-2, 'out');
      if (returnLse) await expectClose(gpu.lse!, cpu.lse!, 1e-3, 'lse');
      else expect(gpu.lse).toBeUndefined();
      disposeAll(q, k, v, qc, kc, vc, gpu.out, gpu.lse, cpu.out, cpu.lse);
    });
  });
});

describe('prefillAttention on CUDA keeps sequences apart', () => {
  // A tile of keys may run past its sequence into the next one (the Hopper kernel's TMA boxes do):
  // a neighbour's inf or NaN keys and values must still never reach another sequence's output.
  for (const dtype of ['bf16', 'f16'] as const) {
    it(`non-finite K/V of one sequence leave the others' outputs exact (D=128, ${dtype})`, async () => {
      const random = rng(300);
      const heads = 8, kvHeads = 2, dim = 128;
      const lens = [200, 150, 300];
      const cu = offsets(lens);
      const nk = cu.at(-1)!, rowLen = kvHeads * dim;
      const k = normal(nk * rowLen, random), v = normal(nk * rowLen, random);
      for (let i = cu[1]! * rowLen; i < cu[2]! * rowLen; i++) {
        k[i] = Number.NaN;
        v[i] = i % 2 ? Number.POSITIVE_INFINITY : Number.NaN;
      }
      const [q, qc] = await pair(normal(nk * heads * dim, random), [nk, heads, dim], dtype);
      const [kg, kc] = await pair(k, [nk, kvHeads, dim], dtype);
      const [vg, vc] = await pair(v, [nk, kvHeads, dim], dtype);
      const opts = { cuSeqlensQ: cu, cuSeqlensK: cu, causal: true };
      const gpuOut = ops.prefillAttention(q, kg, vg, opts).out, cpuOut = ops.prefillAttention(qc, kc, vc, opts).out;
      const gpu = (await gpuOut.toArray()) as Float32Array, cpu = (await cpuOut.toArray()) as Float32Array;
      const rowsOf = (a: Float32Array, b: number) => a.subarray(cu[b]! * heads * dim, cu[b + 1]! * heads * dim);
      for (const b of [0, 2]) {
        expect(rowsOf(gpu, b).every(Number.isFinite), `sequence ${b} finite`).toBe(true);
        expect(maxAbsDiff(rowsOf(gpu, b), rowsOf(cpu, b)), `sequence ${b}`).toBeLessThan(2e-2);
      }
      disposeAll(q, kg, vg, qc, kc, vc, gpuOut, cpuOut);
    });
  }
});

describe('paged attention on CUDA', () => {
  const layouts = [
    { pageSize: 1, lens: [1, 5, 33] },
    { pageSize: 16, lens: [1, 16, 17, 300, 1000] },
    { pageSize: 256, lens: [3, 256, 700] },
  ];
  let seed = 200;
  for (const { pageSize, lens } of layouts) {
    for (const dim of DIMS) {
      const ratio = GQA[(dim / 64 + pageSize) % 4]!;
      const dtype: GpuDType = dim === 128 ? 'f16' : 'bf16';
      it(`P=${pageSize} D=${dim} H/Hkv=${ratio} ${dtype}: decode and paged prefill match the reference`, async () => {
        const random = rng(seed++);
        const heads = 8, kvHeads = 8 / ratio;
        const { cache, gpuPages, cpuPages, pages } = await pagedPair(lens, pageSize, kvHeads, dim, dtype, random);

        const [q, qc] = await pair(normal(lens.length * heads * dim, random), [lens.length, heads, dim], dtype);
        const gpu = ops.pagedDecodeAttention(q, gpuPages, cache, { returnLse: true });
        const cpu = ops.pagedDecodeAttention(qc, cpuPages, cache, { returnLse: true });
        await expectClose(gpu.out, cpu.out, 2e-2, 'decode out');
        await expectClose(gpu.lse!, cpu.lse!, 1e-3, 'decode lse');

        // Chunked prefill: the last few tokens of each sequence attend to the cached prefix.
        const qLens = lens.map((l, i) => Math.min(l, 1 + ((i * 7) % 23)));
        const cuSeqlensQ = offsets(qLens);
        const nq = cuSeqlensQ.at(-1)!;
        const [pq, pqc] = await pair(normal(nq * heads * dim, random), [nq, heads, dim], dtype);
        const pg = ops.pagedPrefillAttention(pq, gpuPages, cache, { cuSeqlensQ, returnLse: true });
        const pc = ops.pagedPrefillAttention(pqc, cpuPages, cache, { cuSeqlensQ, returnLse: true });
        await expectClose(pg.out, pc.out, 2e-2, 'paged prefill out');
        await expectClose(pg.lse!, pc.lse!, 1e-3, 'paged prefill lse');

        // The same keys laid out contiguously give the same answer through the ragged kernel.
        const [k, v] = [Tensor.fromArray(cache.k, [cache.k.length / (kvHeads * dim), kvHeads, dim], { dtype, device }), Tensor.fromArray(cache.v, [cache.v.length / (kvHeads * dim), kvHeads, dim], { dtype, device })];
        const ragged = ops.prefillAttention(pq, k, v, { cuSeqlensQ, cuSeqlensK: offsets(lens), returnLse: true });
        await expectClose(pg.out, ragged.out, 2e-2, 'paged vs ragged out');
        await expectClose(pg.lse!, ragged.lse!, 1e-3, 'paged vs ragged lse');
        disposeAll(...pages, q, qc, gpu.out, gpu.lse, cpu.out, cpu.lse, pq, pqc, pg.out, pg.lse, pc.out, pc.lse, k, v, ragged.out, ragged.lse);
      });
    }
  }

  // The decode takes GQA groups in tiles of 16 heads: one tile (groups up to 16), two (17-32), four
  // (33-64), and blocks of 64 heads beyond; each bucket at a length that splits and one that does not.
  const groups = [3, 12, 16, 17, 24, 32, 33, 48, 64, 65, 96];
  for (const [gi, group] of groups.entries()) {
    const dim = DIMS[gi % 3]!;
    const dtype: GpuDType = gi % 2 ? 'f16' : 'bf16';
    it(`H/Hkv=${group} D=${dim} ${dtype}: decode (split and not), paged and ragged prefill match the reference`, async () => {
      const random = rng(400 + gi);
      const [kvHeads, pageSize] = [2, 16];
      const heads = kvHeads * group;
      const lens = [1, 17, 300, 2500];
      const { cache, gpuPages, cpuPages, pages } = await pagedPair(lens, pageSize, kvHeads, dim, dtype, random);
      const [q, qc] = await pair(normal(lens.length * heads * dim, random), [lens.length, heads, dim], dtype);
      const cpu = ops.pagedDecodeAttention(qc, cpuPages, cache, { returnLse: true });
      for (const splits of [undefined, 1, 5]) {
        const gpu = ops.pagedDecodeAttention(q, gpuPages, cache, { returnLse: true, splits });
        await expectClose(gpu.out, cpu.out, 2e-2, `decode out, splits ${splits ?? 'auto'}`);
        await expectClose(gpu.lse!, cpu.lse!, 1e-3, `decode lse, splits ${splits ?? 'auto'}`);
        disposeAll(gpu.out, gpu.lse);
      }
      const cuSeqlensQ = offsets([1, 3, 2, 1]);
      const [pq, pqc] = await pair(normal(7 * heads * dim, random), [7, heads, dim], dtype);
      const pg = ops.pagedPrefillAttention(pq, gpuPages, cache, { cuSeqlensQ, returnLse: true });
      const pc = ops.pagedPrefillAttention(pqc, cpuPages, cache, { cuSeqlensQ, returnLse: true });
      await expectClose(pg.out, pc.out, 2e-2, 'paged prefill out');
      await expectClose(pg.lse!, pc.lse!, 1e-3, 'paged prefill lse');
      // The ragged kernel (the Hopper one at D = 128) over the same keys laid out contiguously.
      const [k, v] = [cache.k, cache.v].map((x) => Tensor.fromArray(x, [x.length / (kvHeads * dim), kvHeads, dim], { dtype, device }));
      const ragged = ops.prefillAttention(pq, k!, v!, { cuSeqlensQ, cuSeqlensK: offsets(lens), returnLse: true });
      await expectClose(ragged.out, pc.out, 2e-2, 'ragged prefill out');
      await expectClose(ragged.lse!, pc.lse!, 1e-3, 'ragged prefill lse');
      disposeAll(...pages, q, qc, cpu.out, cpu.lse, pq, pqc, pg.out, pg.lse, pc.out, pc.lse, k, v, ragged.out, ragged.lse);
    });
  }

  it('splits a long sequence across blocks and agrees with the unsplit batch', async () => {
    // Alone, a 40000-token sequence is split (flash-decoding); inside a batch of 256 it is not.
    const random = rng(300);
    const [heads, kvHeads, dim, pageSize] = [32, 8, 128, 16];
    const lens = [40000, ...Array.from({ length: 255 }, (_, i) => 1 + ((i * 37) % 64))];
    const cache = pagedCache(lens, pageSize, kvHeads, dim, random);
    const poolShape = [cache.numPages, pageSize, kvHeads, dim];
    using kPages = Tensor.fromArray(cache.kPages, poolShape, { dtype: 'bf16', device });
    using vPages = Tensor.fromArray(cache.vPages, poolShape, { dtype: 'bf16', device });
    const qData = normal(lens.length * heads * dim, random);
    using q = Tensor.fromArray(qData, [lens.length, heads, dim], { dtype: 'bf16', device });
    const batch = ops.pagedDecodeAttention(q, { kPages, vPages }, cache, { returnLse: true });
    const alone = { indptr: cache.indptr.slice(0, 2), indices: cache.indices.slice(0, cache.indptr[1]), lastPageLen: cache.lastPageLen.slice(0, 1) };
    using q1 = q.slice(0, 1);
    const single = ops.pagedDecodeAttention(q1, { kPages, vPages }, alone, { returnLse: true });
    using firstOut = batch.out.slice(0, 1);
    using firstLse = batch.lse!.slice(0, 1);
    await expectClose(single.out, firstOut, 1e-2, 'split vs unsplit out');
    await expectClose(single.lse!, firstLse, 1e-3, 'split vs unsplit lse');
    // And both against the reference.
    using kc = Tensor.fromArray((await kPages.toArray()) as Float32Array, poolShape);
    using vc = Tensor.fromArray((await vPages.toArray()) as Float32Array, poolShape);
    using qc = Tensor.fromArray((await q1.toArray()) as Float32Array, [1, heads, dim]);
    const ref = ops.pagedDecodeAttention(qc, { kPages: kc, vPages: vc }, alone, { returnLse: true });
    await expectClose(single.out, ref.out, 2e-2, 'split vs reference');
    await expectClose(single.lse!, ref.lse!, 1e-3, 'split lse vs reference');
    disposeAll(batch.out, batch.lse, single.out, single.lse, ref.out, ref.lse);
  });

  it('agrees with itself at any forced split count', async () => {
    const random = rng(302);
    const [heads, kvHeads, dim, pageSize] = [16, 4, 128, 16];
    const lens = [5000, 33, 1, 2049];
    const cache = pagedCache(lens, pageSize, kvHeads, dim, random);
    const poolShape = [cache.numPages, pageSize, kvHeads, dim];
    using kPages = Tensor.fromArray(cache.kPages, poolShape, { dtype: 'bf16', device });
    using vPages = Tensor.fromArray(cache.vPages, poolShape, { dtype: 'bf16', device });
    using q = Tensor.fromArray(normal(lens.length * heads * dim, random), [lens.length, heads, dim], { dtype: 'bf16', device });
    const one = ops.pagedDecodeAttention(q, { kPages, vPages }, cache, { returnLse: true, splits: 1 });
    for (const splits of [2, 7, 64]) {
      const many = ops.pagedDecodeAttention(q, { kPages, vPages }, cache, { returnLse: true, splits });
      await expectClose(many.out, one.out, 8e-3, `out, ${splits} splits`);
      await expectClose(many.lse!, one.lse!, 1e-4, `lse, ${splits} splits`);
      disposeAll(many.out, many.lse);
    }
    disposeAll(one.out, one.lse);
  });

  it('decodes a batch of 1024 short sequences', async () => {
    const random = rng(301);
    const [heads, kvHeads, dim, pageSize] = [4, 2, 64, 8];
    const lens = Array.from({ length: 1024 }, (_, i) => 1 + ((i * 13) % 40));
    const cache = pagedCache(lens, pageSize, kvHeads, dim, random);
    const poolShape = [cache.numPages, pageSize, kvHeads, dim];
    const [kPages, kc] = await pair(cache.kPages, poolShape, 'bf16');
    const [vPages, vc] = await pair(cache.vPages, poolShape, 'bf16');
    const [q, qc] = await pair(normal(1024 * heads * dim, random), [1024, heads, dim], 'bf16');
    const gpu = ops.pagedDecodeAttention(q, { kPages, vPages }, cache, { returnLse: true });
    const cpu = ops.pagedDecodeAttention(qc, { kPages: kc, vPages: vc }, cache, { returnLse: true });
    await expectClose(gpu.out, cpu.out, 2e-2, 'out');
    await expectClose(gpu.lse!, cpu.lse!, 1e-3, 'lse');
    disposeAll(kPages, kc, vPages, vc, q, qc, gpu.out, gpu.lse, cpu.out, cpu.lse);
  });

  it('decodes a 1M-token context (a small pool, pages repeated in the table)', async () => {
    // 65536 table entries of 16 tokens: positions and page offsets past 2^20 elements per head, the
    // deepest split plan, and a 3-token neighbour that must stay exact beside it.
    const random = rng(303);
    const [heads, kvHeads, dim, pageSize, poolPages] = [8, 2, 64, 16, 512];
    const longPages = 1 << 16;
    const indices = Int32Array.from({ length: longPages + 1 }, () => Math.floor(random() * poolPages));
    const table = { indptr: Int32Array.of(0, longPages, longPages + 1), indices, lastPageLen: Int32Array.of(pageSize, 3) };
    const poolShape = [poolPages, pageSize, kvHeads, dim];
    const poolSize = poolPages * pageSize * kvHeads * dim;
    const [kPages, kc] = await pair(normal(poolSize, random), poolShape, 'bf16');
    const [vPages, vc] = await pair(normal(poolSize, random), poolShape, 'bf16');
    // Twice unit scale: a peaked softmax, so the output depends on which pages were read where.
    const [q, qc] = await pair(normal(2 * heads * dim, random).map((x) => 2 * x), [2, heads, dim], 'bf16');
    const gpu = ops.pagedDecodeAttention(q, { kPages, vPages }, table, { returnLse: true });
    const cpu = ops.pagedDecodeAttention(qc, { kPages: kc, vPages: vc }, table, { returnLse: true });
    await expectClose(gpu.out, cpu.out, 2e-2, 'out');
    await expectClose(gpu.lse!, cpu.lse!, 1e-3, 'lse');
    disposeAll(kPages, kc, vPages, vc, q, qc, gpu.out, gpu.lse, cpu.out, cpu.lse);
  });

  for (const pageSize of [1, 16, 256]) {
    it(`appendPagedKV writes the same bytes as the CPU reference (P=${pageSize})`, async () => {
      const random = rng(400 + pageSize);
      const [kvHeads, dim] = [2, 128];
      const lens = [1, 300, 17];
      const cache = pagedCache(lens, pageSize, kvHeads, dim, random);
      const poolShape = [cache.numPages, pageSize, kvHeads, dim];
      using kPages = Tensor.fromArray(cache.kPages, poolShape, { dtype: 'bf16', device });
      using vPages = Tensor.fromArray(cache.vPages, poolShape, { dtype: 'bf16', device });
      using kPagesC = kPages.to('cpu');
      using vPagesC = vPages.to('cpu');
      // Every token of sequence 1 (a bulk write) and the last tokens of the others.
      const batchIndices = [...Array.from({ length: 300 }, () => 1), 0, 2];
      const positions = [...Array.from({ length: 300 }, (_, i) => i), 0, 16];
      const n = batchIndices.length;
      using k = Tensor.fromArray(normal(n * kvHeads * dim, random), [n, kvHeads, dim], { dtype: 'bf16', device });
      using v = Tensor.fromArray(normal(n * kvHeads * dim, random), [n, kvHeads, dim], { dtype: 'bf16', device });
      using kc = k.to('cpu');
      using vc = v.to('cpu');
      ops.appendPagedKV(k, v, { kPages, vPages }, cache, { batchIndices, positions });
      ops.appendPagedKV(kc, vc, { kPages: kPagesC, vPages: vPagesC }, cache, { batchIndices, positions });
      expect(Buffer.from(await kPages.bytes()).equals(Buffer.from(await kPagesC.bytes()))).toBe(true);
      expect(Buffer.from(await vPages.bytes()).equals(Buffer.from(await vPagesC.bytes()))).toBe(true);
    });
  }
});

describe('attentionMass on CUDA', () => {
  for (const per of ['page', 'token'] as const) {
    it(`matches the reference per ${per}, for decode and for an observation window`, async () => {
      const random = rng(800);
      const [heads, kvHeads, dim, pageSize] = [32, 8, 128, 16];
      const lens = [1, 17, 300, 1000];
      const cache = pagedCache(lens, pageSize, kvHeads, dim, random);
      const poolShape = [cache.numPages, pageSize, kvHeads, dim];
      const [kPages, kc] = await pair(cache.kPages, poolShape, 'bf16');
      const [vPages, vc] = await pair(cache.vPages, poolShape, 'bf16');
      for (const qLens of [[1, 1, 1, 1], [1, 8, 32, 32]]) {
        const cuSeqlensQ = offsets(qLens);
        const nq = cuSeqlensQ.at(-1)!;
        const [q, qc] = await pair(normal(nq * heads * dim, random), [nq, heads, dim], 'bf16');
        const attn = ops.pagedPrefillAttention(qc, { kPages: kc, vPages: vc }, cache, { cuSeqlensQ, returnLse: true });
        using lseGpu = attn.lse!.to(device);
        using gpu = ops.attentionMass(q, kPages, cache, lseGpu, { cuSeqlensQ, per });
        using cpu = ops.attentionMass(qc, kc, cache, attn.lse!, { cuSeqlensQ, per });
        expect(gpu.shape).toEqual(cpu.shape);
        const [g, c] = [(await gpu.toArray()) as Float32Array, (await cpu.toArray()) as Float32Array];
        expect(maxAbsDiff(g, c)).toBeLessThan(1e-3 * Math.max(1, ...c));
        disposeAll(q, qc, attn.out, attn.lse);
      }
      disposeAll(kPages, kc, vPages, vc);
    });
  }
});

describe('attention input checks on CUDA', () => {
  function code(fn: () => unknown): string {
    try {
      fn();
    } catch (e) {
      expect(e).toBeInstanceOf(KvflashError);
      return (e as KvflashError).code;
    }
    return 'none';
  }

  it('refuses unsupported head dims, f32 and mixed devices', () => {
    using q = Tensor.zeros([2, 2, 96], { dtype: 'bf16', device });
    expect(code(() => ops.prefillAttention(q, q, q, { cuSeqlensQ: [0, 2], cuSeqlensK: [0, 2] }))).toBe('E_UNSUPPORTED');
    using q32 = Tensor.zeros([2, 2, 64], { device });
    expect(code(() => ops.prefillAttention(q32, q32, q32, { cuSeqlensQ: [0, 2], cuSeqlensK: [0, 2] }))).toBe('E_DTYPE');
    using qg = Tensor.zeros([2, 2, 64], { dtype: 'bf16', device });
    using kc = Tensor.zeros([2, 2, 64], { dtype: 'bf16' });
    expect(code(() => ops.prefillAttention(qg, kc, kc, { cuSeqlensQ: [0, 2], cuSeqlensK: [0, 2] }))).toBe('E_DEVICE');
  });
});
