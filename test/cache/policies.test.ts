// Eviction policies, each against its rule, with the page table, positions and data kept consistent.
import { describe, expect, it } from 'vitest';

import { H2O, SnapKV, StreamingLLM } from '../../lib/cache/index';
import { KvflashError } from '../../lib/index';
import { rng } from '../attention-fixtures';
import { appendTokens, decodeSequence, readPools, smallCache } from './fixtures';

/** Every slot holds the token whose id is its absolute position, at that position per pageStarts. */
async function expectConsistent(cache: ReturnType<typeof smallCache>, seq: number): Promise<void> {
  const info = cache.info(seq);
  const slots = decodeSequence(cache, await readPools(cache), seq, cache.layers - 1);
  slots.forEach(({ token, position }, i) => {
    const page = Math.floor(i / cache.pageSize);
    expect(position).toBe(info.pageStarts[page]! + (i % cache.pageSize));
    expect(token).toBe(position);
  });
  expect(info.nextPosition).toBe(slots.at(-1)!.position + 1);
  const table = cache.pageTable([seq]);
  expect([...table.indices]).toEqual([...info.pages]);
  expect(table.lastPageLen[0]).toBe(info.length - (info.pages.length - 1) * cache.pageSize);
}

describe('StreamingLLM', () => {
  for (const [sinkPages, windowPages] of [[1, 2], [2, 1], [0, 1]] as const) {
    it(`keeps exactly ${sinkPages} sink page(s) and a window of ${windowPages} as a sequence grows, in a pool that would otherwise run out`, async () => {
      const budget = sinkPages + windowPages;
      using cache = smallCache({ numPages: budget, policy: new StreamingLLM({ sinkPages, windowPages }) });
      const seq = cache.addSequence();
      for (let position = 0; position < 60; position++) {
        appendTokens(cache, seq, [position], position);
        const { pages, pageStarts } = cache.info(seq);
        expect(pages.length).toBe(Math.min(budget, Math.ceil((position + 1) / 4)));
        const lastStart = Math.floor(position / 4) * 4;
        if (lastStart >= budget * 4) {
          const sinks = Array.from({ length: sinkPages }, (_, i) => i * 4);
          const window = Array.from({ length: windowPages }, (_, i) => lastStart - (windowPages - 1 - i) * 4);
          expect([...pageStarts]).toEqual([...sinks, ...window]);
        }
      }
      await expectConsistent(cache, seq);
      expect(cache.stats()).toMatchObject({ evictedPages: 15 - budget, used: budget });
    });
  }

  it('trims a long prefill on evict(), and leaves a fork that shares the dropped pages intact', async () => {
    using cache = smallCache({ policy: new StreamingLLM({ sinkPages: 1, windowPages: 1 }) });
    const seq = cache.addSequence();
    const prompt = Array.from({ length: 18 }, (_, i) => i);
    appendTokens(cache, seq, prompt, 0); // 5 pages at once: nothing is complete on every layer before the write
    expect(cache.info(seq).pages).toHaveLength(5);
    const fork = cache.fork(seq);
    expect(cache.evict(seq)).toBe(3);
    expect([...cache.info(seq).pageStarts]).toEqual([0, 16]);
    await expectConsistent(cache, seq);
    await expectConsistent(cache, fork);
    expect(cache.info(fork).pages).toHaveLength(5);
    for (const page of cache.info(fork).pages) expect(cache.refCount(page)).toBe(cache.info(seq).pages.includes(page) ? 2 : 1);
    appendTokens(cache, seq, [18, 19]);
    await expectConsistent(cache, seq);
    await expectConsistent(cache, fork);
  });

  it('checks its options', () => {
    expect(() => new StreamingLLM({ sinkPages: -1, windowPages: 2 })).toThrow('Expected non-negative integer for sinkPages but received -1 of type number');
    expect(() => new StreamingLLM({ sinkPages: 1, windowPages: 0 })).toThrow(KvflashError);
  });
});

describe('H2O', () => {
  it('keeps the recent page and the heaviest older pages by accumulated attention mass', async () => {
    const budgetPages = 4, recentPages = 1, pageSize = 2;
    using cache = smallCache({ pageSize, numPages: 8, policy: new H2O({ budgetPages, recentPages }) });
    const seq = cache.addSequence();
    const random = rng(9);
    const massByStart = new Map<number, number>();
    for (let position = 0; position < 40; position++) {
      appendTokens(cache, seq, [position], position);
      const { pages, pageStarts } = cache.info(seq);
      expect(pages.length).toBeLessThanOrEqual(budgetPages);
      if (position % pageSize === pageSize - 1) {
        // The page just completed draws its (synthetic) attention mass, in two installments.
        const weight = random();
        massByStart.set(pageStarts.at(-1)!, weight);
        for (const part of [0.25, 0.75]) cache.recordAttentionMass(seq, Array.from(pageStarts, (_, i) => (i === pages.length - 1 ? weight * part : 0)));
      }
    }
    await expectConsistent(cache, seq);
    const { pageStarts } = cache.info(seq);
    const newest = pageStarts.at(-1)!;
    const heaviest = [...massByStart.entries()]
      .filter(([start]) => start !== newest)
      .sort((a, b) => b[1] - a[1])
      .slice(0, budgetPages - recentPages)
      .map(([start]) => start)
      .sort((a, b) => a - b);
    expect([...pageStarts]).toEqual([...heaviest, newest]);
  });

  it('checks its options and the mass it is given', () => {
    expect(() => new H2O({ budgetPages: 2, recentPages: 2 })).toThrow('Expected integer in [1, 1] (below budgetPages) for recentPages but received 2 of type number');
    using cache = smallCache({ policy: new H2O({ budgetPages: 2, recentPages: 1 }) });
    const seq = cache.addSequence();
    appendTokens(cache, seq, [0]);
    expect(() => cache.recordAttentionMass(seq, [Number.NaN])).toThrow('Expected finite non-negative number for massPerPage[0] but received NaN of type number');
    expect(() => cache.recordAttentionMass(seq, [1, 2])).toThrow(expect.objectContaining({ code: 'E_SHAPE' }));
  });
});

describe('SnapKV', () => {
  const pageSize = 4, promptLength = 32;
  /** Scores with a peak in the middle of each listed page. */
  const peaks = (pages: number[]) => {
    const scores = new Float32Array(promptLength).fill(0.01);
    for (const p of pages) scores[p * pageSize + 1] = 1;
    return scores;
  };

  for (const pooling of ['max', 'avg'] as const) {
    it(`keeps the observation window and each KV head's best pages (${pooling} pooling)`, async () => {
      using cache = smallCache({ pageSize, kvHeads: 2, policy: new SnapKV({ windowPages: 2, capacityPages: 2, pooling }) });
      const seq = cache.addSequence();
      appendTokens(cache, seq, Array.from({ length: promptLength }, (_, i) => i), 0);
      const before = cache.info(seq).pages;
      const { evicted, headPages } = cache.compress(seq, [peaks([1, 3]), peaks([5, 3])]);
      expect(evicted).toBe(3);
      const { pages, pageStarts, length, nextPosition } = cache.info(seq);
      expect([...pageStarts]).toEqual([4, 12, 20, 24, 28]);
      expect({ length, nextPosition }).toEqual({ length: 20, nextPosition: 32 });
      expect(headPages.map((h) => [...h])).toEqual([[1, 3, 6, 7].map((s) => before[s]), [3, 5, 6, 7].map((s) => before[s])]);
      for (const h of headPages) expect(h.every((page) => pages.includes(page))).toBe(true);
      await expectConsistent(cache, seq);
      expect(cache.stats()).toMatchObject({ used: 5, evictedPages: 3 });
    });
  }

  it('keeps everything when the prompt fits, and checks the scores it is given', () => {
    using cache = smallCache({ pageSize, kvHeads: 2, policy: new SnapKV({ windowPages: 1, capacityPages: 8 }) });
    const seq = cache.addSequence();
    appendTokens(cache, seq, Array.from({ length: promptLength }, (_, i) => i), 0);
    expect(cache.compress(seq, [peaks([0]), peaks([1])]).evicted).toBe(0);
    expect(() => cache.compress(seq, [peaks([0])])).toThrow('Expected 2 Float32Arrays (one per KV head) for scores but received an array');
    expect(() => cache.compress(seq, [peaks([0]), new Float32Array(3)])).toThrow(expect.objectContaining({ code: 'E_SHAPE', message: expect.stringContaining('scores[1]') }));
    expect(() => new SnapKV({ windowPages: 1, capacityPages: 1, kernelSize: 4 })).toThrow('Expected odd positive integer for kernelSize but received 4 of type number');
  });
});
