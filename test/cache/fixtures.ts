// Test data for the cache managers: every key and value element is a distinct small integer derived
// from (token id, absolute position, layer, K or V, head, dim), exact in f32, so reading a sequence
// back through its pages shows which token and position each slot holds.
import { expect } from 'vitest';

import { PagedKVCache, PagedKVCacheOptions } from '../../lib/cache/index';
import { KvflashError, Tensor } from '../../lib/index';

export const KEY = 0;
export const VALUE = 1;

export function element(token: number, position: number, layer: number, which: number, head: number, dim: number, kvHeads: number, headDim: number): number {
  return (((token * 1000 + position) * 8 + layer) * 2 + which) * kvHeads * headDim + head * headDim + dim;
}

/** Rows [tokens.length, kvHeads, headDim] for tokens at positions from `start` on. */
export function rows(tokens: readonly number[], start: number, layer: number, which: number, kvHeads: number, headDim: number): Float32Array {
  const out = new Float32Array(tokens.length * kvHeads * headDim);
  tokens.forEach((token, i) => {
    for (let h = 0; h < kvHeads; h++) {
      for (let d = 0; d < headDim; d++) out[(i * kvHeads + h) * headDim + d] = element(token, start + i, layer, which, h, d, kvHeads, headDim);
    }
  });
  return out;
}

export function kvTensors(cache: PagedKVCache, tokens: readonly number[], start: number, layer: number): [Tensor, Tensor] {
  const shape = [tokens.length, cache.kvHeads, cache.headDim];
  const opts = { dtype: cache.dtype, device: cache.device as 'cpu' };
  return [
    Tensor.fromArray(rows(tokens, start, layer, KEY, cache.kvHeads, cache.headDim), shape, opts),
    Tensor.fromArray(rows(tokens, start, layer, VALUE, cache.kvHeads, cache.headDim), shape, opts),
  ];
}

/** Appends `tokens` to every layer of `seq` with the single-sequence append, at positions from `start`. */
export function appendTokens(cache: PagedKVCache, seq: number, tokens: readonly number[], start = cache.info(seq).nextPosition): void {
  for (let layer = 0; layer < cache.layers; layer++) {
    const [k, v] = kvTensors(cache, tokens, start, layer);
    try {
      cache.append(seq, layer, k, v);
    } finally {
      k.dispose();
      v.dispose();
    }
  }
}

/** [layer][K or V]: every layer's pools on the host. */
export async function readPools(cache: PagedKVCache): Promise<Float32Array[][]> {
  const out: Float32Array[][] = [];
  for (let layer = 0; layer < cache.layers; layer++) {
    const { kPages, vPages } = cache.pages(layer);
    out.push([(await kPages.toArray()) as Float32Array, (await vPages.toArray()) as Float32Array]);
  }
  return out;
}

/**
 * The (token, position) of each slot of `seq` on `layer`, decoded from the pools; throws when a slot's
 * elements do not all agree with one (token, position).
 */
export function decodeSequence(cache: PagedKVCache, pools: Float32Array[][], seq: number, layer = 0): { token: number; position: number }[] {
  const { length, pages } = cache.info(seq);
  const { kvHeads, headDim, pageSize } = cache;
  const row = kvHeads * headDim;
  const out: { token: number; position: number }[] = [];
  for (let i = 0; i < length; i++) {
    const at = (pages[Math.floor(i / pageSize)]! * pageSize + (i % pageSize)) * row;
    const first = pools[layer]![KEY]![at]!;
    const code = Math.floor(first / row / 2 / 8);
    const position = code % 1000;
    const token = (code - position) / 1000;
    for (const which of [KEY, VALUE]) {
      for (let e = 0; e < row; e++) {
        const expected = element(token, position, layer, which, Math.floor(e / headDim), e % headDim, kvHeads, headDim);
        if (pools[layer]![which]![at + e] !== expected) throw new Error(`slot ${i} of sequence ${seq} on layer ${layer} is not one token's data`);
      }
    }
    out.push({ token, position });
  }
  return out;
}

/** The CSR table of `seqIds` as info() describes their pages, to hold the cache's tables against. */
export function expectedTable(cache: PagedKVCache, seqIds: readonly number[]): { indptr: number[]; indices: number[]; lastPageLen: number[] } {
  const infos = seqIds.map((seq) => cache.info(seq));
  const indptr = [0];
  for (const info of infos) indptr.push(indptr.at(-1)! + info.pages.length);
  return {
    indptr,
    indices: infos.flatMap((info) => [...info.pages]),
    lastPageLen: infos.map((info) => info.length - (info.pages.length - 1) * cache.pageSize),
  };
}

/** The table of `seqIds` from the cache's kept buffers (the path every step takes), as plain arrays. */
export function keptTable(cache: PagedKVCache, seqIds: readonly number[]): { indptr: number[]; indices: number[]; lastPageLen: number[] } {
  const { indptr, indices, lastPageLen } = cache.pageTable(seqIds, { reuseBuffers: true });
  return { indptr: [...indptr], indices: [...indices], lastPageLen: [...lastPageLen] };
}

export function smallCache(overrides: Partial<PagedKVCacheOptions> = {}): PagedKVCache {
  return new PagedKVCache({ layers: 2, numPages: 16, pageSize: 4, kvHeads: 2, headDim: 2, dtype: 'f32', ...overrides });
}

/** The KvflashError code `call` throws, or undefined when it returns. */
export function codeOf(call: () => unknown): string | undefined {
  try {
    call();
  } catch (error) {
    expect(error).toBeInstanceOf(KvflashError);
    return (error as KvflashError).code;
  }
  return undefined;
}
