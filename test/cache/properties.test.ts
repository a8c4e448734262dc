// Random sequences of cache operations against a plain model of each sequence's token history:
// after every operation no page is leaked or owned twice, reference counts are exact, every
// sequence still reads back exactly its own tokens at their positions (so copy-on-write and
// eviction never touched another sequence's data), prefix hits hold the prompt they stand for, and a
// refused operation (E_OOM) changed nothing.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';

import { EvictionPolicy, H2O, PagedKVCache, StreamingLLM } from '../../lib/cache/index';
import { KvflashError, Tensor } from '../../lib/index';
import { appendTokens, decodeSequence, expectedTable, KEY, keptTable, readPools, rows, VALUE } from './fixtures';

/** Prompts that share prefixes, so that later sequences hit pages earlier ones cached. */
const PROMPTS = [
  Array.from({ length: 14 }, (_, i) => 1 + i),
  [1, 2, 3, 4, 5, 6, 7, 8, 30, 31, 32, 33, 34, 35],
  [1, 2, 3, 4, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49],
];

interface ModelSequence {
  /** Token id at every absolute position ever appended (positions dropped by eviction included). */
  history: number[];
  /** Prompt tokens not yet appended. */
  pending: number[];
}

type Command =
  | { op: 'add'; prompt: number; length: number }
  | { op: 'append'; pick: number; tokens: number; batchWith: number | null }
  | { op: 'fork'; pick: number }
  | { op: 'truncate'; pick: number; keep: number }
  | { op: 'free'; pick: number }
  | { op: 'evict'; pick: number }
  | { op: 'mass'; pick: number; seed: number };

const command: fc.Arbitrary<Command> = fc.oneof(
  { weight: 2, arbitrary: fc.record({ op: fc.constant('add' as const), prompt: fc.integer({ min: -1, max: PROMPTS.length - 1 }), length: fc.integer({ min: 1, max: 14 }) }) },
  { weight: 5, arbitrary: fc.record({ op: fc.constant('append' as const), pick: fc.nat(), tokens: fc.integer({ min: 1, max: 6 }), batchWith: fc.option(fc.nat()) }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('fork' as const), pick: fc.nat() }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('truncate' as const), pick: fc.nat(), keep: fc.double({ min: 0, max: 1, noNaN: true }) }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('free' as const), pick: fc.nat() }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('evict' as const), pick: fc.nat() }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('mass' as const), pick: fc.nat(), seed: fc.nat({ max: 96 }) }) },
);

async function checkInvariants(cache: PagedKVCache, model: Map<number, ModelSequence>): Promise<void> {
  const owners = new Int32Array(cache.numPages);
  for (const page of cache.prefix?.cachedPages() ?? []) owners[page]!++;
  expect(new Set(cache.prefix?.cachedPages()).size).toBe(cache.prefix?.stats().pages ?? 0);
  expect(cache.sequences().sort((a, b) => a - b)).toEqual([...model.keys()].sort((a, b) => a - b));
  const pools = await readPools(cache);
  for (const [seq, expected] of model) {
    const info = cache.info(seq);
    expect(new Set(info.pages).size).toBe(info.pages.length); // no page twice in one sequence
    expect(info.pages.length).toBe(Math.ceil(info.length / cache.pageSize));
    for (const page of info.pages) owners[page]!++;
    expect(info.nextPosition).toBe(expected.history.length);
    for (let layer = 0; layer < cache.layers; layer++) {
      decodeSequence(cache, pools, seq, layer).forEach(({ token, position }, i) => {
        expect(position).toBe(info.pageStarts[Math.floor(i / cache.pageSize)]! + (i % cache.pageSize));
        expect(token).toBe(expected.history[position]);
      });
    }
  }
  for (let page = 0; page < cache.numPages; page++) expect(cache.refCount(page)).toBe(owners[page]);
  const used = owners.filter((o) => o > 0).length;
  expect(cache.stats()).toMatchObject({ used, free: cache.numPages - used, shared: owners.filter((o) => o > 1).length });
  // The same batch every time, so the kept buffers are brought up to date across every operation.
  const holding = [...model.keys()].filter((seq) => cache.info(seq).length > 0);
  if (holding.length > 0) expect(keptTable(cache, holding)).toEqual(expectedTable(cache, holding));
}

/** Appends to every layer of one or two sequences at once through beginStep. */
function appendStep(cache: PagedKVCache, batch: { seq: number; tokens: number[] }[]): void {
  using step = cache.beginStep(batch.map(({ seq, tokens }) => ({ seq, tokens: tokens.length })));
  const shape = [step.slots.length, cache.kvHeads, cache.headDim];
  for (let layer = 0; layer < cache.layers; layer++) {
    const data = (which: number) =>
      Float32Array.from(batch.flatMap(({ tokens }, b) => [...rows(tokens, step.positions[step.cuSeqlensQ[b]!]!, layer, which, cache.kvHeads, cache.headDim)]));
    using k = Tensor.fromArray(data(KEY), shape);
    using v = Tensor.fromArray(data(VALUE), shape);
    step.append(layer, k, v);
  }
}

async function run(commands: Command[], makeCache: () => PagedKVCache): Promise<void> {
  using cache = makeCache();
  const model = new Map<number, ModelSequence>();
  let nextToken = 60;
  const pick = (n: number) => {
    const live = [...model.keys()];
    return live.length === 0 ? undefined : live[n % live.length]!;
  };
  const nextTokens = (state: ModelSequence, count: number) => {
    const fromPrompt = state.pending.slice(0, count);
    const fresh = Array.from({ length: count - fromPrompt.length }, () => (nextToken = 60 + ((nextToken - 59) % 30)));
    return [...fromPrompt, ...fresh];
  };
  for (const c of commands) {
    const seq = c.op === 'add' ? undefined : pick(c.pick);
    if (c.op !== 'add' && seq === undefined) continue;
    const state = seq === undefined ? undefined : model.get(seq)!;
    if (c.op === 'add') {
      const prompt = c.prompt < 0 ? undefined : PROMPTS[c.prompt]!.slice(0, c.length);
      const id = cache.addSequence({ prompt });
      const { length } = cache.info(id);
      expect(length % cache.pageSize).toBe(0);
      if (prompt) expect(length).toBeLessThanOrEqual(Math.max(0, Math.floor((prompt.length - 1) / cache.pageSize)) * cache.pageSize);
      // A hit is the cache's own pages (their data is checked below against the prompt).
      const cached = new Set(cache.prefix!.cachedPages());
      expect([...cache.info(id).pages].every((page) => cached.has(page))).toBe(true);
      model.set(id, { history: prompt?.slice(0, length) ?? [], pending: prompt?.slice(length) ?? [] });
    } else if (c.op === 'append') {
      const other = c.batchWith === null ? undefined : pick(c.batchWith);
      const batch = [{ seq: seq!, tokens: nextTokens(state!, c.tokens) }];
      if (other !== undefined && other !== seq) batch.push({ seq: other, tokens: nextTokens(model.get(other)!, 1) });
      const before = { stats: cache.stats(), infos: [...model.keys()].map((s) => cache.info(s)) };
      try {
        if (batch.length === 1 && c.tokens % 2 === 0) appendTokens(cache, seq!, batch[0]!.tokens, state!.history.length);
        else appendStep(cache, batch);
      } catch (error) {
        expect(error).toBeInstanceOf(KvflashError);
        expect((error as KvflashError).code).toBe('E_OOM');
        expect({ stats: cache.stats(), infos: [...model.keys()].map((s) => cache.info(s)) }).toEqual(before);
        continue;
      }
      for (const { seq: s, tokens } of batch) {
        const m = model.get(s)!;
        m.history.push(...tokens);
        m.pending = m.pending.slice(Math.min(m.pending.length, tokens.length));
      }
    } else if (c.op === 'fork') {
      model.set(cache.fork(seq!), { history: [...state!.history], pending: [] });
    } else if (c.op === 'truncate') {
      const length = Math.floor(c.keep * cache.info(seq!).length);
      cache.truncate(seq!, length);
      state!.history = state!.history.slice(0, cache.info(seq!).nextPosition);
      state!.pending = [];
    } else if (c.op === 'free') {
      cache.free(seq!);
      model.delete(seq!);
      expect(() => cache.free(seq!)).toThrow(KvflashError);
    } else if (c.op === 'evict') {
      cache.evict(seq!);
    } else {
      cache.recordAttentionMass(seq!, Array.from(cache.info(seq!).pages, (_, i) => ((c.seed + 1) * (i + 3)) % 7));
    }
    await checkInvariants(cache, model);
  }
}

const cacheWith = (pageSize: number, numPages: number, policy?: EvictionPolicy) => () =>
  new PagedKVCache({ layers: 2, numPages, pageSize, kvHeads: 1, headDim: 2, dtype: 'f32', prefixCache: true, policy });

describe('PagedKVCache under random operations', () => {
  it('keeps pages, reference counts and every sequence\'s data exact (prefix cache, forks, truncation, running out)', async () => {
    await fc.assert(
      fc.asyncProperty(fc.constantFrom(2, 4), fc.array(command, { minLength: 5, maxLength: 40, size: 'max' }), (pageSize, commands) => run(commands, cacheWith(pageSize, 8))),
      { numRuns: 60 },
    );
  });

  it('keeps the page table and positions consistent while StreamingLLM drops pages', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(command, { minLength: 5, maxLength: 40, size: 'max' }), (commands) => run(commands, cacheWith(2, 10, new StreamingLLM({ sinkPages: 1, windowPages: 2 })))),
      { numRuns: 60 },
    );
  });

  it('keeps the page table and positions consistent while H2O drops the lightest pages', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(command, { minLength: 5, maxLength: 40, size: 'max' }), (commands) => run(commands, cacheWith(2, 10, new H2O({ budgetPages: 4, recentPages: 1 })))),
      { numRuns: 60 },
    );
  });
});
