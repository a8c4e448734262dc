// PrefixCache inside a PagedKVCache: a prompt's full pages are reused by the next sequence with the
// same prefix, counted as hits and misses, and evicted least recently used, tail first, only when
// no sequence holds them.
import { describe, expect, it } from 'vitest';

import { ops, Tensor } from '../../lib/index';
import { normal, rng } from '../attention-fixtures';
import { appendTokens, decodeSequence, KEY, readPools, rows, smallCache, VALUE } from './fixtures';

const prompt = (from: number, length: number) => Array.from({ length }, (_, i) => from + i);

describe('PrefixCache', () => {
  it('reuses the pages of the longest cached prefix, the same pages, and counts hits and misses', async () => {
    using cache = smallCache({ prefixCache: true });
    const tokens = prompt(1, 10);
    const first = cache.addSequence({ prompt: tokens });
    expect(cache.info(first).length).toBe(0);
    appendTokens(cache, first, tokens);
    expect(cache.stats().prefix).toEqual({ pages: 2, hits: 0, misses: 2, evictions: 0 });
    const firstPages = cache.info(first).pages;
    // Same first 8 tokens, then different: both full pages are reused.
    const second = cache.addSequence({ prompt: [...tokens.slice(0, 8), 40, 41, 42] });
    expect(cache.info(second)).toMatchObject({ length: 8, nextPosition: 8, written: Int32Array.from([8, 8]) });
    expect([...cache.info(second).pages]).toEqual([...firstPages.subarray(0, 2)]);
    expect(cache.stats().prefix).toMatchObject({ hits: 2, misses: 2 });
    appendTokens(cache, second, [40, 41, 42]);
    const pools = await readPools(cache);
    expect(decodeSequence(cache, pools, second).map((s) => s.token)).toEqual([...tokens.slice(0, 8), 40, 41, 42]);
    // A prompt of exactly 8 tokens reuses one page: its last token must be computed again.
    const third = cache.addSequence({ prompt: tokens.slice(0, 8) });
    expect(cache.info(third).length).toBe(4);
    // A different first page: a miss, nothing reused.
    const fourth = cache.addSequence({ prompt: [99, ...tokens.slice(1)] });
    expect(cache.info(fourth).length).toBe(0);
    expect(cache.stats().prefix).toMatchObject({ hits: 3, misses: 4 });
    expect(cache.refCount(firstPages[0]!)).toBe(4); // first, second, third and the cache
  });

  it('keeps cached pages after their sequence is freed and evicts them LRU, tail of a chain first', () => {
    using cache = smallCache({ numPages: 6, prefixCache: true });
    const older = prompt(1, 9), newer = prompt(50, 9);
    const a = cache.addSequence({ prompt: older });
    appendTokens(cache, a, older); // 3 pages, 2 of them cached
    const [olderRoot, olderTail] = cache.info(a).pages;
    const b = cache.addSequence({ prompt: newer });
    appendTokens(cache, b, newer);
    const newerPages = cache.info(b).pages;
    cache.free(a);
    cache.free(b);
    expect(cache.stats()).toMatchObject({ used: 4, free: 2, prefix: { pages: 4 } });
    // Needs 3 pages: one eviction, the older chain's tail.
    const c = cache.addSequence();
    appendTokens(cache, c, prompt(80, 12));
    expect(cache.stats().prefix).toMatchObject({ pages: 3, evictions: 1 });
    expect(cache.info(c).pages).toContain(olderTail);
    const again = cache.addSequence({ prompt: older });
    expect([...cache.info(again).pages]).toEqual([olderRoot]);
    expect(cache.info(again).length).toBe(4);
    // The newer chain is now the least recently used; its tail goes before its root.
    cache.free(again);
    const d = cache.addSequence();
    appendTokens(cache, d, [1]);
    expect(cache.info(d).pages[0]).toBe(newerPages[1]);
  });

  it('never evicts a page a sequence holds, and reports E_OOM instead', () => {
    using cache = smallCache({ numPages: 3, prefixCache: true });
    const tokens = prompt(1, 9);
    const a = cache.addSequence({ prompt: tokens });
    appendTokens(cache, a, tokens);
    const b = cache.addSequence();
    expect(() => appendTokens(cache, b, [1])).toThrow(expect.objectContaining({ code: 'E_OOM' }));
    expect(cache.stats()).toMatchObject({ used: 3, prefix: { pages: 2, evictions: 0 } });
    expect(cache.info(b).length).toBe(0);
  });

  it('keeps a cached page intact when its sequence is truncated into it and rewritten (copy on write)', async () => {
    using cache = smallCache({ prefixCache: true });
    const tokens = prompt(1, 8);
    const a = cache.addSequence({ prompt: tokens });
    appendTokens(cache, a, tokens.slice(0, 6)); // the first page is full and cached
    const cached = cache.info(a).pages[0]!;
    cache.truncate(a, 2);
    appendTokens(cache, a, [30, 31, 32, 33, 34, 35]); // not the prompt any more: nothing new cached
    expect(cache.info(a).pages[0]).not.toBe(cached);
    expect(cache.stats().prefix?.pages).toBe(1);
    const b = cache.addSequence({ prompt: [...tokens, 0] });
    expect([...cache.info(b).pages]).toEqual([cached]);
    const pools = await readPools(cache);
    expect(decodeSequence(cache, pools, b).map((s) => s.token)).toEqual([1, 2, 3, 4]);
    expect(decodeSequence(cache, pools, a).map((s) => s.token)).toEqual([1, 2, 30, 31, 32, 33, 34, 35]);
  });

  it('gives a prefill that reuses cached pages the attention of one that computed them', async () => {
    using cache = smallCache({ prefixCache: true, layers: 1 });
    const tokens = prompt(1, 10);
    const first = cache.addSequence({ prompt: tokens });
    appendTokens(cache, first, tokens);
    const second = cache.addSequence({ prompt: tokens });
    const reused = cache.info(second).length;
    expect(reused).toBe(8);
    using step = cache.beginStep([{ seq: second, tokens: tokens.length - reused }]);
    const rest = tokens.slice(reused);
    const shape = [rest.length, cache.kvHeads, cache.headDim];
    using k = Tensor.fromArray(rows(rest, step.positions[0]!, 0, KEY, cache.kvHeads, cache.headDim), shape);
    using v = Tensor.fromArray(rows(rest, step.positions[0]!, 0, VALUE, cache.kvHeads, cache.headDim), shape);
    step.append(0, k, v);
    using q = Tensor.fromArray(normal(rest.length * 4 * cache.headDim, rng(1)), [rest.length, 4, cache.headDim]);
    const cuSeqlensQ = step.cuSeqlensQ;
    // The fixture keys are large integers: a small scale keeps the softmax from being one-hot.
    const viaCache = ops.pagedPrefillAttention(q, cache.pages(0), step.table, { cuSeqlensQ, scale: 1e-5 });
    const computed = ops.pagedPrefillAttention(q, cache.pages(0), cache.pageTable([first]), { cuSeqlensQ, scale: 1e-5 });
    expect([...(await viaCache.out.toArray())]).toEqual([...(await computed.out.toArray())]);
    viaCache.out.dispose();
    computed.out.dispose();
  });
});
