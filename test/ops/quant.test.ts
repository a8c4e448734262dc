// The quantized KV-cache formats on the CPU reference: packing and layout against a JS definition,
// the error bound of every format, constant groups, non-finite input, token-by-token appending, the
// quantized decode against plain paged decode over the dequantized pages, and the host checks.
import { describe, expect, it } from 'vitest';

import { KvflashError, ops, Tensor } from '../../lib/index';
import type { PagedPrefillOptions, QuantFormat, QuantizedKVPages, TailPages } from '../../lib/index';
import { maxAbsDiff, normal, offsets, rng } from '../attention-fixtures';
import { dequantizedPool, expectSelectedDecodeMatches, FORMATS, quantizedCache, unpackCode } from '../quant-fixtures';

const INT_FORMATS: QuantFormat[] = ['int8', 'int4', 'int2'];
const BITS: Record<QuantFormat, number> = { fp8e4m3: 8, int8: 8, int4: 4, int2: 2 };

/** Quantizes one page (k, v [P, Hkv, D] given as data) into page 0 of a fresh layer. */
function quantizeOne(k: Float32Array, v: Float32Array, shape: [number, number, number], format: QuantFormat, groupSize = 32, dtype: 'f32' | 'bf16' = 'f32'): QuantizedKVPages {
  const [P, H, D] = shape;
  using kSrc = Tensor.fromArray(k, [1, P, H, D], { dtype });
  using vSrc = Tensor.fromArray(v, [1, P, H, D], { dtype });
  const q = ops.createQuantizedPages(1, P, H, D, { format, groupSize });
  ops.quantizePages({ kSrc, vSrc, srcPages: [0], dstPages: [0] }, q);
  return q;
}

async function reconstruct(q: QuantizedKVPages): Promise<{ k: Float32Array; v: Float32Array }> {
  const { k, v } = ops.dequantizePages(q, [0]);
  const out = { k: (await k.toArray()) as Float32Array, v: (await v.toArray()) as Float32Array };
  k.dispose();
  v.dispose();
  return out;
}

/** The step each element was quantized with: the stored scale of its channel (keys) or group (values). */
async function stepOf(q: QuantizedKVPages, keys: boolean, [P, H, D]: [number, number, number]): Promise<(t: number, h: number, d: number) => number> {
  const scale = (await (keys ? q.kScale : q.vScale).toArray()) as Float32Array;
  if (q.format === 'fp8e4m3') return (_t, h) => scale[h]!;
  const G = q.groupSize, NG = D / G;
  return keys ? (_t, h, d) => scale[h * D + d]! : (t, h, d) => scale[(t * H + h) * NG + Math.floor(d / G)]!;
}

/** max over elements of |x - x^| / allowed, where allowed is s/2 (integer) or the fp8 rounding bound. */
async function worstRatio(q: QuantizedKVPages, x: Float32Array, xr: Float32Array, keys: boolean, shape: [number, number, number]): Promise<number> {
  const [P, H, D] = shape;
  const step = await stepOf(q, keys, shape);
  let worst = 0;
  for (let t = 0; t < P; t++)
    for (let h = 0; h < H; h++)
      for (let d = 0; d < D; d++) {
        const i = (t * H + h) * D + d;
        const s = step(t, h, d);
        const xs = Number.isNaN(x[i]!) ? 0 : Math.max(-65504, Math.min(65504, x[i]!));
        // fp8: half an e4m3 step (2^-4 relative) of x/s, or half the subnormal step 2^-9, times s.
        const allowed = q.format === 'fp8e4m3' ? Math.max(Math.abs(xs) * 2 ** -4, s * 2 ** -10) : s / 2;
        const err = Math.abs(xs - xr[i]!);
        const slack = 1e-6 * Math.max(Math.abs(xs), 1e-30); // float32 rounding of the arithmetic
        worst = Math.max(worst, err <= slack ? 0 : (err - slack) / allowed);
      }
  return worst;
}

describe('quantized page formats (CPU reference)', () => {
  it('packs codes least-significant bits first in the documented layout, and unpacks exactly', async () => {
    const [P, H, D] = [4, 2, 64];
    for (const format of INT_FORMATS) {
      const bits = BITS[format], levels = 2 ** bits - 1;
      const random = rng(bits);
      // Values on an exact grid min + c * s (s a power of two, min an f16), codes 0 and `levels` in every group.
      const codesK = new Int32Array(P * H * D), codesV = new Int32Array(P * H * D);
      const k = new Float32Array(P * H * D), v = new Float32Array(P * H * D);
      for (let i = 0; i < k.length; i++) {
        codesK[i] = Math.floor(random() * (levels + 1));
        codesV[i] = Math.floor(random() * (levels + 1));
      }
      for (let h = 0; h < H; h++)
        for (let d = 0; d < D; d++) {
          codesK[(0 * H + h) * D + d] = 0;
          codesK[(1 * H + h) * D + d] = levels;
        }
      for (let t = 0; t < P; t++)
        for (let h = 0; h < H; h++) {
          codesV[(t * H + h) * D + 0] = 0;
          codesV[(t * H + h) * D + 1] = levels;
          codesV[(t * H + h) * D + 32] = 0;
          codesV[(t * H + h) * D + 33] = levels;
        }
      for (let i = 0; i < k.length; i++) {
        k[i] = -1.5 + codesK[i]! * 0.125;
        v[i] = 0.25 + codesV[i]! * 2 ** -6;
      }
      const q = quantizeOne(k, v, [P, H, D], format);
      const kBytes = (await q.kCodes.toArray()) as Uint8Array;
      const vBytes = (await q.vCodes.toArray()) as Uint8Array;
      const rowBytes = (D * bits) / 8;
      expect(q.kCodes.shape).toEqual([1, P, H, rowBytes]);
      for (let r = 0; r < P * H; r++)
        for (let d = 0; d < D; d++) {
          expect(unpackCode(kBytes, r * rowBytes, d, bits)).toBe(codesK[r * D + d]);
          expect(unpackCode(vBytes, r * rowBytes, d, bits)).toBe(codesV[r * D + d]);
        }
      expect(new Set((await q.kScale.toArray()) as Float32Array)).toEqual(new Set([0.125]));
      expect(new Set((await q.kMin!.toArray()) as Float32Array)).toEqual(new Set([-1.5]));
      expect(new Set((await q.vScale.toArray()) as Float32Array)).toEqual(new Set([2 ** -6]));
      const back = await reconstruct(q);
      expect(back.k).toEqual(k);
      expect(back.v).toEqual(v);
      ops.disposeQuantizedPages(q);
    }
  });

  for (const format of FORMATS) {
    for (const groupSize of format === 'fp8e4m3' ? [32] : [32, 64, 128]) {
      it(`${format} G=${groupSize}: every element within s/2 of the input (gaussian keys with outlier channels)`, async () => {
        const shape: [number, number, number] = [16, 2, 128];
        const random = rng(groupSize + BITS[format]);
        const k = normal(16 * 2 * 128, random), v = normal(16 * 2 * 128, random);
        for (let i = 0; i < k.length; i++) if (i % 128 === 5 || i % 128 === 77) k[i] = k[i]! * 30 + 10; // outlier channels
        const q = quantizeOne(k, v, shape, format, groupSize);
        const back = await reconstruct(q);
        expect(await worstRatio(q, k, back.k, true, shape)).toBeLessThanOrEqual(1);
        expect(await worstRatio(q, v, back.v, false, shape)).toBeLessThanOrEqual(1);
        ops.disposeQuantizedPages(q);
      });
    }
  }

  for (const format of FORMATS) {
    it(`${format}: constant groups give no NaN and reconstruct within the bound (integer formats: exactly when the value is an f16)`, async () => {
      const shape: [number, number, number] = [8, 1, 64];
      for (const c of [0, 0.5, -3, 0.3, 1e-7]) {
        const x = new Float32Array(8 * 64).fill(c);
        const q = quantizeOne(x, x, shape, format);
        const back = await reconstruct(q);
        for (const arr of [back.k, back.v]) {
          for (const y of arr) expect(Number.isFinite(y)).toBe(true);
        }
        expect(await worstRatio(q, x, back.k, true, shape)).toBeLessThanOrEqual(1);
        expect(await worstRatio(q, x, back.v, false, shape)).toBeLessThanOrEqual(1);
        if (format !== 'fp8e4m3' && (c === 0 || c === 0.5 || c === -3)) {
          expect(back.k).toEqual(x);
          expect(back.v).toEqual(x);
        }
        ops.disposeQuantizedPages(q);
      }
    });
  }

  for (const format of FORMATS) {
    it(`${format}: NaN quantizes as 0, infinities and values beyond f16 saturate at ±65504, nothing non-finite comes back`, async () => {
      const shape: [number, number, number] = [4, 1, 32];
      const random = rng(9);
      const x = normal(4 * 32, random);
      x[3] = NaN;
      x[40] = Infinity;
      x[41] = -Infinity;
      x[90] = 1e9;
      const q = quantizeOne(x, x, shape, format);
      const back = await reconstruct(q);
      for (const arr of [back.k, back.v]) for (const y of arr) expect(Number.isFinite(y)).toBe(true);
      for (const s of (await q.kScale.toArray()) as Float32Array) expect(Number.isFinite(s)).toBe(true);
      expect(await worstRatio(q, x, back.k, true, shape)).toBeLessThanOrEqual(1);
      expect(await worstRatio(q, x, back.v, false, shape)).toBeLessThanOrEqual(1);
      ops.disposeQuantizedPages(q);
    });
  }

  for (const format of FORMATS) {
    it(`${format}: appending token by token into the tail, then quantizing it, gives the bytes of quantizing the page at once`, async () => {
      const [P, H, D] = [8, 2, 64];
      const random = rng(21);
      const k = normal(P * H * D, random), v = normal(P * H * D, random);
      using kTail = Tensor.zeros([2, P, H, D], { dtype: 'bf16' });
      using vTail = Tensor.zeros([2, P, H, D], { dtype: 'bf16' });
      for (let t = 0; t < P; t++) {
        using kt = Tensor.fromArray(k.subarray(t * H * D, (t + 1) * H * D), [1, H, D], { dtype: 'bf16' });
        using vt = Tensor.fromArray(v.subarray(t * H * D, (t + 1) * H * D), [1, H, D], { dtype: 'bf16' });
        ops.appendPagedKV(kt, vt, { kPages: kTail, vPages: vTail }, { indptr: [0, 1], indices: [1], lastPageLen: [t + 1] }, { batchIndices: [0], positions: [t] });
      }
      const q = ops.createQuantizedPages(2, P, H, D, { format });
      ops.quantizePages({ kSrc: kTail, vSrc: vTail, srcPages: [1], dstPages: [0] }, q);
      using kWhole = Tensor.fromArray(k, [1, P, H, D], { dtype: 'bf16' });
      using vWhole = Tensor.fromArray(v, [1, P, H, D], { dtype: 'bf16' });
      ops.quantizePages({ kSrc: kWhole, vSrc: vWhole, srcPages: [0], dstPages: [1] }, q);
      for (const t of [q.kCodes, q.vCodes, q.kScale, q.kMin, q.vScale, q.vMin]) {
        if (!t) continue;
        const bytes = await t.bytes();
        const half = bytes.length / 2;
        expect(bytes.subarray(0, half)).toEqual(bytes.subarray(half));
      }
      ops.disposeQuantizedPages(q);
    });
  }
});

describe('quantizedPagedDecodeAttention (CPU reference)', () => {
  for (const format of FORMATS) {
    for (const [dtype, pageSize] of [['f32', 4], ['bf16', 16]] as const) {
      it(`${format} ${dtype} P=${pageSize}: equals paged decode over the dequantized pages and the tail`, async () => {
        const random = rng(31 + pageSize);
        const [heads, kvHeads, dim] = [8, 2, 64];
        const lens = [1, pageSize, pageSize + 1, 5 * pageSize - 2];
        const qc = quantizedCache(lens, pageSize, kvHeads, dim, random, { format, dtype, device: 'cpu' });
        using q = Tensor.fromArray(normal(lens.length * heads * dim, random), [lens.length, heads, dim], { dtype });
        const got = ops.quantizedPagedDecodeAttention(q, qc.quant, qc, qc.table, { returnLse: true });
        const pool = await dequantizedPool(qc);
        using qf = q.to('cpu').cast('f32');
        const want = ops.pagedDecodeAttention(qf, pool, qc.combinedTable, { returnLse: true });
        const tol = dtype === 'f32' ? 1e-5 : 1e-2;
        expect(maxAbsDiff((await got.out.toArray()) as Float32Array, (await want.out.toArray()) as Float32Array)).toBeLessThan(tol);
        expect(maxAbsDiff((await got.lse!.toArray()) as Float32Array, (await want.lse!.toArray()) as Float32Array)).toBeLessThan(1e-4);
        for (const t of [got.out, got.lse, want.out, want.lse, pool.kPages, pool.vPages]) t?.dispose();
        qc.dispose();
      });
    }
  }
});

describe('quantizedPagedDecodeAttention over a per-KV-head selection (CPU reference)', () => {
  for (const [format, pageSize, budget] of [['int4', 4, 3], ['int2', 16, 2], ['fp8e4m3', 4, 100]] as const) {
    it(`${format} P=${pageSize} budget ${budget}: equals the per-head paged decode over the dequantized pages`, async () => {
      const random = rng(40 + pageSize + budget);
      const [heads, kvHeads, dim] = [8, 2, 64];
      const lens = [1, pageSize + 1, 7 * pageSize - 3, 3 * pageSize];
      const qc = quantizedCache(lens, pageSize, kvHeads, dim, random, { format, dtype: 'f32', device: 'cpu' });
      using q = Tensor.fromArray(normal(lens.length * heads * dim, random), [lens.length, heads, dim]);
      using scores = Tensor.fromArray(normal(qc.table.indices.length * kvHeads, random), [qc.table.indices.length, kvHeads]);
      using selected = await expectSelectedDecodeMatches(q, qc, scores, budget);
      if (budget >= Math.max(...lens)) {
        // Every page fits the budget: the selection is the dense table.
        const dense = ops.quantizedPagedDecodeAttention(q, qc.quant, qc, qc.table, { returnLse: true });
        const sparse = ops.quantizedPagedDecodeAttention(q, qc.quant, qc, selected, { returnLse: true });
        expect(await dense.out.toArray()).toEqual(await sparse.out.toArray());
        for (const t of [dense.out, dense.lse, sparse.out, sparse.lse]) t?.dispose();
      }
      qc.dispose();
    });
  }

  it('checks a selection against the layer it decodes and refuses it for the prefill', () => {
    const random = rng(45);
    const qc = quantizedCache([5, 9], 4, 2, 64, random, { format: 'int8', dtype: 'f32', device: 'cpu' });
    using q = Tensor.fromArray(normal(2 * 4 * 64, random), [2, 4, 64]);
    using scores = Tensor.fromArray(normal(qc.table.indices.length * 2, random), [qc.table.indices.length, 2]);
    using selected = ops.topkPages(scores, qc.table, 2);
    const small = ops.createQuantizedPages(2, 4, 2, 64, { format: 'int8' }); // the table's pages reach past it
    expect(() => ops.quantizedPagedDecodeAttention(q, small, qc, selected)).toThrow(expect.objectContaining({ code: 'E_RANGE' }));
    ops.disposeQuantizedPages(small);
    using scores4 = Tensor.fromArray(normal(qc.table.indices.length * 4, random), [qc.table.indices.length, 4]);
    using fourRows = ops.topkPages(scores4, qc.table, 2); // a row per KV head of a 4-head layer
    expect(() => ops.quantizedPagedDecodeAttention(q, qc.quant, qc, fourRows)).toThrow(expect.objectContaining({ code: 'E_SHAPE' }));
    using q6 = Tensor.fromArray(normal(6 * 4 * 64, random), [6, 4, 64]);
    expect(() => ops.quantizedPagedPrefillAttention(q6, qc.quant, qc, selected, { cuSeqlensQ: [0, 2, 6] })).toThrow(
      expect.objectContaining({ code: 'E_UNSUPPORTED' }),
    );
    qc.dispose();
  });
});

describe('quantizedPagedPrefillAttention (CPU reference)', () => {
  // Odd lengths, one-token sequences, partial tails, sequences whose only page is the tail, Sq < Sk and
  // Sq = Sk, a sequence with no queries; causal, windowed and non-causal masks; GQA and not.
  const cases = [
    { dtype: 'f32', pageSize: 4, lens: [1, 4, 5, 17, 9], qLens: [1, 2, 5, 3, 0], heads: 8, kvHeads: 2, dim: 32, groupSize: 32, causal: true, windowLeft: -1 },
    { dtype: 'bf16', pageSize: 16, lens: [16, 1, 33, 70], qLens: [16, 1, 7, 70], heads: 4, kvHeads: 4, dim: 64, groupSize: 64, causal: true, windowLeft: 5 },
    { dtype: 'f16', pageSize: 1, lens: [3, 1, 6], qLens: [2, 1, 6], heads: 6, kvHeads: 3, dim: 32, groupSize: 32, causal: false, windowLeft: -1 },
  ] as const;
  let seed = 60;
  for (const format of FORMATS) {
    for (const c of cases) {
      it(`${format} ${c.dtype} P=${c.pageSize} H/Hkv=${c.heads / c.kvHeads} causal=${c.causal} window=${c.windowLeft}: equals pagedPrefillAttention over the dequantized pages bit for bit`, async () => {
        const random = rng(seed++);
        const qc = quantizedCache([...c.lens], c.pageSize, c.kvHeads, c.dim, random, { format, groupSize: c.groupSize, dtype: c.dtype, device: 'cpu' });
        const cuSeqlensQ = offsets(c.qLens);
        const nq = cuSeqlensQ.at(-1)!;
        using q = Tensor.fromArray(normal(nq * c.heads * c.dim, random), [nq, c.heads, c.dim], { dtype: c.dtype });
        const opts = { cuSeqlensQ, causal: c.causal, windowLeft: c.windowLeft, returnLse: true };
        const got = ops.quantizedPagedPrefillAttention(q, qc.quant, qc, qc.table, opts);
        const pool = await dequantizedPool(qc, c.dtype);
        const want = ops.pagedPrefillAttention(q, pool, qc.combinedTable, opts);
        expect(await got.out.bytes()).toEqual(await want.out.bytes());
        expect(await got.lse!.bytes()).toEqual(await want.lse!.bytes());
        for (const t of [got.out, got.lse, want.out, want.lse, pool.kPages, pool.vPages]) t?.dispose();
        qc.dispose();
      });
    }
  }

  it('one query per sequence at its end is the quantized decode', async () => {
    const random = rng(77);
    const lens = [1, 4, 5, 23];
    const qc = quantizedCache(lens, 4, 2, 32, random, { format: 'int4', dtype: 'f32', device: 'cpu' });
    using q = Tensor.fromArray(normal(lens.length * 4 * 32, random), [lens.length, 4, 32]);
    const prefill = ops.quantizedPagedPrefillAttention(q, qc.quant, qc, qc.table, { cuSeqlensQ: offsets(lens.map(() => 1)), returnLse: true });
    const decode = ops.quantizedPagedDecodeAttention(q, qc.quant, qc, qc.table, { returnLse: true });
    expect(maxAbsDiff((await prefill.out.toArray()) as Float32Array, (await decode.out.toArray()) as Float32Array)).toBeLessThan(1e-6);
    expect(maxAbsDiff((await prefill.lse!.toArray()) as Float32Array, (await decode.lse!.toArray()) as Float32Array)).toBeLessThan(1e-6);
    for (const t of [prefill.out, prefill.lse, decode.out, decode.lse]) t?.dispose();
    qc.dispose();
  });
});

describe('quantized ops refuse bad input', () => {
  const expectCode = (f: () => unknown, code: string) => {
    try {
      f();
    } catch (e) {
      expect(e).toBeInstanceOf(KvflashError);
      expect((e as KvflashError).code).toBe(code);
      return;
    }
    throw new Error(`expected ${code}`);
  };

  it('checks formats, group sizes, dtypes, shapes and every index', () => {
    const random = rng(5);
    const qc = quantizedCache([5, 9], 4, 2, 64, random, { format: 'int4', dtype: 'f32', device: 'cpu' });
    using q = Tensor.fromArray(normal(2 * 4 * 64, random), [2, 4, 64]);
    const decode = (quant: QuantizedKVPages, table = qc.table) => ops.quantizedPagedDecodeAttention(q, quant, qc, table);
    expectCode(() => decode({ ...qc.quant, format: 'int3' as QuantFormat }), 'E_RANGE');
    expectCode(() => decode({ ...qc.quant, groupSize: 16 }), 'E_RANGE');
    expectCode(() => decode({ ...qc.quant, kScale: qc.quant.kMin!.cast('f32') }), 'E_DTYPE');
    expectCode(() => decode({ ...qc.quant, vScale: qc.quant.kScale }), 'E_SHAPE');
    expectCode(() => decode({ ...qc.quant, format: 'int8' }), 'E_SHAPE'); // head dim 32 from the codes: q has 64
    using q3 = Tensor.zeros([3, 4, 64]);
    expect(() => ops.quantizedPagedDecodeAttention(q3, qc.quant, qc, qc.table)).toThrow('Expected 2 rows (one per sequence of the page table) for q but received 3');
    const bad = { ...qc.table, indices: Int32Array.from(qc.table.indices) };
    bad.indices[qc.table.indptr[1]! - 1] = qc.numTail; // a tail index past the tail pool
    expectCode(() => decode(qc.quant, bad), 'E_RANGE');
    const badQ = { ...qc.table, indices: Int32Array.from(qc.table.indices) };
    badQ.indices[0] = qc.cache.numPages; // a quantized index past the pool (sequence 0 has 2 pages)
    expectCode(() => decode(qc.quant, badQ), 'E_RANGE');
    using src = Tensor.zeros([2, 4, 2, 64]);
    expectCode(() => ops.quantizePages({ kSrc: src, vSrc: src, srcPages: [0, 1], dstPages: [3, 3] }, qc.quant), 'E_RANGE');
    expectCode(() => ops.quantizePages({ kSrc: src, vSrc: src, srcPages: [2], dstPages: [0] }, qc.quant), 'E_RANGE');
    expectCode(() => ops.quantizePages({ kSrc: src, vSrc: src, srcPages: [0], dstPages: [0, 1] }, qc.quant), 'E_SHAPE');
    using wrong = Tensor.zeros([2, 4, 2, 32]);
    expectCode(() => ops.quantizePages({ kSrc: wrong, vSrc: wrong, srcPages: [0], dstPages: [0] }, qc.quant), 'E_SHAPE');
    expectCode(() => ops.dequantizePages(qc.quant, [qc.cache.numPages]), 'E_RANGE');
    expectCode(() => ops.createQuantizedPages(1, 4, 1, 48, { format: 'int4', groupSize: 32 }), 'E_SHAPE');
    qc.dispose();
  });

  it('checks the quantized prefill like the paged prefill and the quantized decode', () => {
    const random = rng(6);
    const qc = quantizedCache([5, 9], 4, 2, 64, random, { format: 'int8', dtype: 'f32', device: 'cpu' });
    using q = Tensor.fromArray(normal(6 * 4 * 64, random), [6, 4, 64]);
    const prefill = (opts: Partial<PagedPrefillOptions> = {}, quant = qc.quant, table = qc.table, tail: TailPages = qc) =>
      ops.quantizedPagedPrefillAttention(q, quant, tail, table, { cuSeqlensQ: [0, 2, 6], ...opts });
    expectCode(() => prefill({}, { ...qc.quant, format: 'int5' as QuantFormat }), 'E_RANGE');
    expectCode(() => prefill({}, { ...qc.quant, vMin: qc.quant.kMin }), 'E_SHAPE');
    using q32 = Tensor.zeros([6, 4, 32]);
    expectCode(() => ops.quantizedPagedPrefillAttention(q32, qc.quant, qc, qc.table, { cuSeqlensQ: [0, 2, 6] }), 'E_SHAPE');
    using q3 = Tensor.zeros([6, 3, 64]);
    expectCode(() => ops.quantizedPagedPrefillAttention(q3, qc.quant, qc, qc.table, { cuSeqlensQ: [0, 2, 6] }), 'E_SHAPE');
    using qb = Tensor.zeros([6, 4, 64], { dtype: 'bf16' });
    expectCode(() => ops.quantizedPagedPrefillAttention(qb, qc.quant, qc, qc.table, { cuSeqlensQ: [0, 2, 6] }), 'E_DTYPE'); // the tail is f32
    using qi = Tensor.zeros([6, 4, 64], { dtype: 'i32' });
    expectCode(() => ops.quantizedPagedPrefillAttention(qi, qc.quant, qc, qc.table, { cuSeqlensQ: [0, 2, 6] }), 'E_DTYPE');
    using vTail = Tensor.zeros([qc.numTail, 4, 2, 32]);
    expectCode(() => prefill({}, qc.quant, qc.table, { kTail: qc.kTail, vTail }), 'E_SHAPE');
    const badTail = { ...qc.table, indices: Int32Array.from(qc.table.indices) };
    const last = qc.table.indptr[2]! - 1;
    badTail.indices[last] = qc.numTail;
    const tailMessage = `Expected indices[${last}] (the last page of sequence 1) in [0, ${qc.numTail}) (the full-precision pages of kTail) but received ${qc.numTail}`;
    expect(() => prefill({}, qc.quant, badTail)).toThrow(expect.objectContaining({ code: 'E_RANGE', message: tailMessage }));
    const badQ = { ...qc.table, indices: Int32Array.from(qc.table.indices) };
    badQ.indices[0] = qc.cache.numPages;
    expectCode(() => prefill({}, qc.quant, badQ), 'E_RANGE');
    expectCode(() => prefill({ cuSeqlensQ: [0, 6] }), 'E_SHAPE');
    const end = 'Expected cuSeqlensQ to end at 6 (the rows of q) but received 5';
    expect(() => prefill({ cuSeqlensQ: [0, 2, 5] })).toThrow(expect.objectContaining({ code: 'E_RANGE', message: end }));
    const causal = 'Expected no more queries than keys for causal sequence 0 but received 6 queries and 5 keys';
    expect(() => prefill({ cuSeqlensQ: [0, 6, 6] })).toThrow(expect.objectContaining({ code: 'E_RANGE', message: causal }));
    const { out } = prefill({ cuSeqlensQ: [0, 6, 6], causal: false });
    out.dispose();
    expectCode(() => prefill({ windowLeft: -2 }), 'E_RANGE');
    expectCode(() => prefill({ scale: 0 }), 'E_RANGE');
    expectCode(() => prefill({ cuSeqlensQ: [0, 2.5, 6] as never }), 'E_RANGE');
    qc.dispose();
  });
});
