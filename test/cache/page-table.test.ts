// Page tables from the cache's kept buffers (pageTable with reuseBuffers, stagePageTable, every step):
// built again over the same batch while the cache changes under it (growth, copy-on-write, truncation,
// eviction, forks, frees), they always say what info() says; a table in new arrays never changes, and
// the kept buffers change only when the cache builds its next table.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';

import { CacheStep, PagedKVCache, PagedKVCacheOptions, StreamingLLM } from '../../lib/cache/index';
import { KvflashError, Tensor } from '../../lib/index';
import { expectedTable, keptTable } from './fixtures';

/** `build: false` leaves the kept buffers alone after the command, so that changes pile up before the next build. */
type Command = { build: boolean } & (
  | { op: 'step'; tokens: number[] }
  | { op: 'append'; pick: number; tokens: number }
  | { op: 'fork'; pick: number }
  | { op: 'truncate'; pick: number; keep: number }
  | { op: 'free'; pick: number }
  | { op: 'add' }
  | { op: 'evict'; pick: number }
);

const operation = fc.oneof(
  { weight: 4, arbitrary: fc.record({ op: fc.constant('step' as const), tokens: fc.array(fc.integer({ min: 1, max: 5 }), { minLength: 1, maxLength: 4 }) }) },
  { weight: 3, arbitrary: fc.record({ op: fc.constant('append' as const), pick: fc.nat(), tokens: fc.integer({ min: 1, max: 5 }) }) },
  { weight: 2, arbitrary: fc.record({ op: fc.constant('fork' as const), pick: fc.nat() }) },
  { weight: 2, arbitrary: fc.record({ op: fc.constant('truncate' as const), pick: fc.nat(), keep: fc.nat() }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('free' as const), pick: fc.nat() }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('add' as const) }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('evict' as const), pick: fc.nat() }) },
);
const command: fc.Arbitrary<Command> = fc.tuple(operation, fc.boolean()).map(([op, build]) => ({ ...op, build }));

type Table = ReturnType<typeof expectedTable>;

const plain = (table: { indptr: ArrayLike<number>; indices: ArrayLike<number>; lastPageLen: ArrayLike<number> }): Table => ({
  indptr: Array.from(table.indptr),
  indices: Array.from(table.indices),
  lastPageLen: Array.from(table.lastPageLen),
});

/** Live sequences that can be rows of a table, in creation order: the batch a decoding loop keeps asking for. */
function batchOf(cache: PagedKVCache): number[] {
  return cache.sequences().filter((seq) => {
    const info = cache.info(seq);
    return info.length > 0 && (info.tail === undefined || info.tail >= 0);
  });
}

function zeros(cache: PagedKVCache, rows: number): Tensor {
  return Tensor.zeros([rows, cache.kvHeads, cache.headDim], { dtype: cache.dtype });
}

/** Runs `call`; the refusals these commands run into (out of pages or tails, a cut through a quantized page) change nothing. */
function tolerate(call: () => void): void {
  try {
    call();
  } catch (error) {
    expect(error).toBeInstanceOf(KvflashError);
    expect(['E_OOM', 'E_UNSUPPORTED']).toContain((error as KvflashError).code);
  }
}

async function run(options: PagedKVCacheOptions, commands: Command[]): Promise<void> {
  using cache = new PagedKVCache(options);
  const fresh: { table: ReturnType<PagedKVCache['pageTable']>; held: Table }[] = [];
  for (let i = 0; i < 3; i++) cache.addSequence();
  const pick = (n: number) => {
    const live = cache.sequences();
    return live.length === 0 ? undefined : live[n % live.length]!;
  };
  let kept: { table: ReturnType<PagedKVCache['pageTable']>; held: Table } | undefined;
  for (const c of commands) {
    const seq = pick('pick' in c ? c.pick : 0);
    if (c.op === 'step') {
      const entries = cache.sequences().map((s, i) => ({ seq: s, tokens: c.tokens[i % c.tokens.length]! }));
      let step: CacheStep | undefined;
      if (entries.length > 0) tolerate(() => (step = cache.beginStep(entries)));
      if (!step) continue;
      kept = undefined;
      try {
        // The step's staged table came from the kept buffers, brought up to date after the step's growth.
        expect(plain(await step.table.toArrays())).toEqual(expectedTable(cache, step.seqIds));
        using k = zeros(cache, step.slots.length);
        using v = zeros(cache, step.slots.length);
        step.append(0, k, v);
      } finally {
        step.dispose();
      }
      continue;
    }
    if (seq === undefined && c.op !== 'add') continue;
    if (c.op === 'append') {
      tolerate(() => {
        using k = zeros(cache, c.tokens);
        using v = zeros(cache, c.tokens);
        cache.append(seq!, 0, k, v);
      });
    } else if (c.op === 'fork') {
      tolerate(() => cache.fork(seq!));
    } else if (c.op === 'truncate') {
      tolerate(() => cache.truncate(seq!, c.keep % (cache.info(seq!).length + 1)));
    } else if (c.op === 'free') {
      cache.free(seq!);
    } else if (c.op === 'add') {
      cache.addSequence();
    } else {
      cache.evict(seq!);
    }
    // Nothing but a build writes the kept buffers (the single-sequence append builds in new arrays).
    if (kept) expect(plain(kept.table)).toEqual(kept.held);
    const now = batchOf(cache);
    if (!c.build || now.length === 0) continue;
    const table = cache.pageTable(now, { reuseBuffers: true });
    kept = { table, held: plain(table) };
    expect(kept.held).toEqual(expectedTable(cache, now));
    const copy = cache.pageTable(now);
    fresh.push({ table: copy, held: plain(copy) });
  }
  for (const { table, held } of fresh) expect(plain(table)).toEqual(held);
}

describe('page tables from the kept buffers', () => {
  it('say what info() says, build after build over the same batch, while pages are added, copied on write, truncated and freed', async () => {
    await fc.assert(
      fc.asyncProperty(fc.constantFrom(1, 2, 4), fc.array(command, { minLength: 5, maxLength: 40, size: 'max' }), (pageSize, commands) =>
        run({ layers: 1, numPages: 96, pageSize, kvHeads: 1, headDim: 1, dtype: 'f32' }, commands),
      ),
      { numRuns: 60 },
    );
  });

  it('do so while StreamingLLM drops pages (rows that shrink)', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(command, { minLength: 5, maxLength: 40, size: 'max' }), (commands) =>
        run({ layers: 1, numPages: 64, pageSize: 2, kvHeads: 1, headDim: 1, dtype: 'f32', policy: new StreamingLLM({ sinkPages: 1, windowPages: 2 }) }, commands),
      ),
      { numRuns: 40 },
    );
  });

  it('do so over quantized pages and tails', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(command, { minLength: 5, maxLength: 30, size: 'max' }), (commands) =>
        run({ layers: 1, numPages: 64, pageSize: 2, kvHeads: 1, headDim: 32, dtype: 'f32', quant: { format: 'int8' }, maxSequences: 12 }, commands),
      ),
      { numRuns: 30 },
    );
  });
});

describe('a batch built again', () => {
  function grown(cache: PagedKVCache, seqs: number[], tokens: number[]): void {
    using step = cache.beginStep(seqs.map((seq, i) => ({ seq, tokens: tokens[i]! })));
    using k = zeros(cache, step.slots.length);
    using v = zeros(cache, step.slots.length);
    step.append(0, k, v);
  }

  it('is refused once one of its sequences was freed or emptied, as a first build would be, and builds again once it is valid', () => {
    using cache = new PagedKVCache({ layers: 1, numPages: 32, pageSize: 2, kvHeads: 1, headDim: 1, dtype: 'f32' });
    const [a, b, c] = [cache.addSequence(), cache.addSequence(), cache.addSequence()];
    grown(cache, [a, b, c], [3, 4, 5]);
    keptTable(cache, [a, b, c]);
    cache.truncate(b, 0);
    expect(() => cache.pageTable([a, b, c], { reuseBuffers: true })).toThrow(expect.objectContaining({ code: 'E_RANGE', message: expect.stringContaining('seqIds[1]') }));
    grown(cache, [b], [1]);
    expect(keptTable(cache, [a, b, c])).toEqual(expectedTable(cache, [a, b, c]));
    cache.free(c);
    expect(() => cache.stagePageTable([a, b, c])).toThrow(expect.objectContaining({ code: 'E_RANGE', message: expect.stringContaining('was freed') }));
    expect(keptTable(cache, [a, b])).toEqual(expectedTable(cache, [a, b]));
  });

  it('is refused once a quantized sequence has no tail', () => {
    using cache = new PagedKVCache({ layers: 1, numPages: 16, pageSize: 2, kvHeads: 1, headDim: 32, dtype: 'f32', quant: { format: 'int8' }, maxSequences: 4 });
    const [a, b] = [cache.addSequence(), cache.addSequence()];
    grown(cache, [a, b], [5, 3]);
    keptTable(cache, [a, b]);
    cache.truncate(a, 4); // a page boundary: every page quantized, no tail
    expect(() => cache.pageTable([a, b], { reuseBuffers: true })).toThrow(expect.objectContaining({ code: 'E_RANGE', message: expect.stringContaining('tail') }));
    grown(cache, [a], [1]);
    expect(keptTable(cache, [a, b])).toEqual(expectedTable(cache, [a, b]));
  });

  it('outgrows the kept buffers and keeps its rows', () => {
    using cache = new PagedKVCache({ layers: 1, numPages: 256, pageSize: 1, kvHeads: 1, headDim: 1, dtype: 'f32' });
    const seqs = [cache.addSequence(), cache.addSequence(), cache.addSequence()];
    grown(cache, seqs, [1, 2, 3]);
    keptTable(cache, seqs);
    for (const tokens of [[40, 0, 1], [0, 0, 60], [1, 90, 1]]) {
      // The single-sequence append: a step would build the kept buffers itself.
      seqs.forEach((seq, i) => {
        if (tokens[i] === 0) return;
        using k = zeros(cache, tokens[i]!);
        using v = zeros(cache, tokens[i]!);
        cache.append(seq, 0, k, v);
      });
      expect(keptTable(cache, seqs)).toEqual(expectedTable(cache, seqs));
    }
  });
});
