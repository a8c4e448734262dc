// Test data for the quantized KV cache: a paged cache whose pages are all quantized, with the last
// page of each sequence also in a full-precision tail pool, and the tables that address it.
import { expect } from 'vitest';

import { ops, Tensor } from '../lib/index';
import type { QuantFormat, QuantizedKVPages } from '../lib/index';
import { maxAbsDiff, pagedCache, PagedCache } from './attention-fixtures';

export const FORMATS: QuantFormat[] = ['fp8e4m3', 'int8', 'int4', 'int2'];

export interface QuantizedCache {
  cache: PagedCache;
  quant: QuantizedKVPages;
  kTail: Tensor;
  vTail: Tensor;
  numTail: number;
  /** Quantized pages, with the last index of each sequence naming its tail page. */
  table: { indptr: Int32Array; indices: Int32Array; lastPageLen: Int32Array };
  /** The same sequences in one pool of numPages + numTail pages: quantized page i is page i, tail page j is numPages + j. */
  combinedTable: { indptr: Int32Array; indices: Int32Array; lastPageLen: Int32Array };
  dispose(): void;
}

export interface QuantizedCacheOptions {
  format: QuantFormat;
  groupSize?: number;
  dtype: 'f32' | 'bf16' | 'f16';
  device: 'cpu' | 'cuda:0';
}

/** Every page of the pool quantized (from the pool rounded to dtype), tails copied to their own pool in reversed order. */
export function quantizedCache(lens: number[], pageSize: number, kvHeads: number, dim: number, random: () => number, opts: QuantizedCacheOptions, cache = pagedCache(lens, pageSize, kvHeads, dim, random)): QuantizedCache {
  const { dtype, device } = opts;
  const poolShape = [cache.numPages, pageSize, kvHeads, dim];
  const kPool = Tensor.fromArray(cache.kPages, poolShape, { dtype, device });
  const vPool = Tensor.fromArray(cache.vPages, poolShape, { dtype, device });
  const quant = ops.createQuantizedPages(cache.numPages, pageSize, kvHeads, dim, { format: opts.format, groupSize: opts.groupSize, device });
  const all = Int32Array.from({ length: cache.numPages }, (_, i) => i);
  ops.quantizePages({ kSrc: kPool, vSrc: vPool, srcPages: all, dstPages: all }, quant);
  const batch = lens.length;
  const numTail = batch + 2;
  const row = pageSize * kvHeads * dim;
  const kTailData = new Float32Array(numTail * row), vTailData = new Float32Array(numTail * row);
  const indices = Int32Array.from(cache.indices), combined = Int32Array.from(cache.indices);
  for (let b = 0; b < batch; b++) {
    const last = cache.indptr[b + 1]! - 1;
    const page = cache.indices[last]!;
    const tail = numTail - 1 - b;
    kTailData.set(cache.kPages.subarray(page * row, (page + 1) * row), tail * row);
    vTailData.set(cache.vPages.subarray(page * row, (page + 1) * row), tail * row);
    indices[last] = tail;
    combined[last] = cache.numPages + tail;
  }
  const tailShape = [numTail, pageSize, kvHeads, dim];
  const kTail = Tensor.fromArray(kTailData, tailShape, { dtype, device });
  const vTail = Tensor.fromArray(vTailData, tailShape, { dtype, device });
  kPool.dispose();
  vPool.dispose();
  return {
    cache,
    quant,
    kTail,
    vTail,
    numTail,
    table: { indptr: cache.indptr, indices, lastPageLen: cache.lastPageLen },
    combinedTable: { indptr: cache.indptr, indices: combined, lastPageLen: cache.lastPageLen },
    dispose() {
      ops.disposeQuantizedPages(quant);
      kTail.dispose();
      vTail.dispose();
    },
  };
}

/** The combined CPU pool of `dtype` (dequantized pages, then the tail pages) that `combinedTable` addresses. */
export async function dequantizedPool(qc: QuantizedCache, dtype: 'f32' | 'bf16' | 'f16' = 'f32'): Promise<{ kPages: Tensor; vPages: Tensor }> {
  const { numPages, pageSize } = qc.cache;
  const all = Int32Array.from({ length: numPages }, (_, i) => i);
  const deq = ops.dequantizePages(qc.quant, all, dtype);
  const [kq, vq] = [(await deq.k.toArray()) as Float32Array, (await deq.v.toArray()) as Float32Array];
  const [kt, vt] = [(await qc.kTail.toArray()) as Float32Array, (await qc.vTail.toArray()) as Float32Array];
  deq.k.dispose();
  deq.v.dispose();
  const join = (a: Float32Array, b: Float32Array) => {
    const out = new Float32Array(a.length + b.length);
    out.set(a);
    out.set(b, a.length);
    return out;
  };
  const shape = [numPages + qc.numTail, pageSize, qc.kTail.shape[2]!, qc.kTail.shape[3]!];
  return { kPages: Tensor.fromArray(join(kq, kt), shape, { dtype }), vPages: Tensor.fromArray(join(vq, vt), shape, { dtype }) };
}

/**
 * Expects the quantized decode (CPU) over `selected` = topkPages(scores, qc.table, budget) to equal the
 * paged decode over the dequantized pool with the same selection (same scores, the pool's ids); returns
 * the selection for further checks (the caller disposes it).
 */
export async function expectSelectedDecodeMatches(q: Tensor, qc: QuantizedCache, scores: Tensor, budget: number): Promise<ops.StagedPageTable> {
  const selected = ops.topkPages(scores, qc.table, budget);
  using selectedPool = ops.topkPages(scores, qc.combinedTable, budget);
  const got = ops.quantizedPagedDecodeAttention(q, qc.quant, qc, selected, { returnLse: true });
  const pool = await dequantizedPool(qc);
  const want = ops.pagedDecodeAttention(q, pool, selectedPool, { returnLse: true });
  expect(maxAbsDiff((await got.out.toArray()) as Float32Array, (await want.out.toArray()) as Float32Array)).toBeLessThan(1e-5);
  expect(maxAbsDiff((await got.lse!.toArray()) as Float32Array, (await want.lse!.toArray()) as Float32Array)).toBeLessThan(1e-4);
  for (const t of [got.out, got.lse, want.out, want.lse, pool.kPages, pool.vPages]) t?.dispose();
  return selected;
}

/** Channel d's code of a packed row (LSB first), the JS definition. */
export function unpackCode(bytes: Uint8Array, rowStart: number, d: number, bits: number): number {
  const bit = d * bits;
  return (bytes[rowStart + (bit >> 3)]! >> (bit & 7)) & ((1 << bits) - 1);
}
