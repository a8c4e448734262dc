// PageArena: slots keep their entries while they grow, move, start as copies of other slots and go
// away, across the packings that fill a new buffer; the buffer stays within twice the most entries
// ever live at once. And a cache whose sequences make the arena pack keeps every page list.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';

import { PagedKVCache } from '../../lib/cache/index';
import { PageArena, PageSlot } from '../../lib/cache/page-arena';
import { Tensor } from '../../lib/index';
import { rng } from '../attention-fixtures';
import { expectedTable, keptTable } from './fixtures';

type Command = { op: 'add'; capacity: number } | { op: 'grow'; pick: number; by: number } | { op: 'copy'; pick: number } | { op: 'release'; pick: number } | { op: 'write'; pick: number; at: number };

const command: fc.Arbitrary<Command> = fc.oneof(
  fc.record({ op: fc.constant('add' as const), capacity: fc.integer({ min: 1, max: 40 }) }),
  fc.record({ op: fc.constant('grow' as const), pick: fc.nat(), by: fc.integer({ min: 1, max: 40 }) }),
  fc.record({ op: fc.constant('copy' as const), pick: fc.nat() }),
  fc.record({ op: fc.constant('release' as const), pick: fc.nat() }),
  fc.record({ op: fc.constant('write' as const), pick: fc.nat(), at: fc.nat() }),
);

const INITIAL_ENTRIES = 64;

describe('PageArena', () => {
  it('keeps every live slot\'s entries across growth, copies, releases and packing, within twice the most entries live', () => {
    fc.assert(
      fc.property(fc.array(command, { minLength: 1, maxLength: 80 }), (commands) => {
        const arena = new PageArena();
        const live: { slot: PageSlot; entries: number[] }[] = [];
        let next = 1;
        let held = 0;
        let mostHeld = 0;
        const fill = (slot: PageSlot, entries: number[]) => {
          for (let i = entries.length; i < slot.pages.length; i++) entries.push((slot.pages[i] = next++));
        };
        for (const c of commands) {
          const picked = c.op === 'add' || live.length === 0 ? undefined : live[c.pick % live.length]!;
          if (c.op === 'add') {
            const slot: PageSlot = { pages: new Int32Array(0), offset: 0, view: undefined };
            arena.place(slot, c.capacity, 0);
            const entries: number[] = [];
            fill(slot, entries);
            live.push({ slot, entries });
            held += c.capacity;
          } else if (!picked) {
            continue;
          } else if (c.op === 'grow') {
            held += c.by;
            arena.place(picked.slot, picked.slot.pages.length + c.by, picked.entries.length);
            fill(picked.slot, picked.entries);
          } else if (c.op === 'copy') {
            // As fork does: the new slot starts as a view of another one, which the placement may move.
            const slot: PageSlot = { pages: picked.slot.pages, offset: 0, view: undefined };
            arena.place(slot, picked.entries.length, picked.entries.length);
            live.push({ slot, entries: [...picked.entries] });
            held += picked.entries.length;
          } else if (c.op === 'release') {
            arena.release(picked.slot);
            live.splice(live.indexOf(picked), 1);
            held -= picked.slot.pages.length;
          } else {
            const at = c.at % picked.entries.length;
            picked.slot.pages[at] = picked.entries[at] = next++;
          }
          mostHeld = Math.max(mostHeld, held);
          for (const { slot, entries } of live) expect([...slot.pages]).toEqual(entries);
          expect(arena.size).toBeLessThanOrEqual(Math.max(INITIAL_ENTRIES, 2 * mostHeld));
        }
      }),
      { numRuns: 200 },
    );
  });

  it('drops a slot\'s cached view when the slot moves', () => {
    const arena = new PageArena();
    const slot: PageSlot = { pages: new Int32Array(0), offset: 0, view: undefined };
    arena.place(slot, 4, 0);
    slot.view = slot.pages.subarray(0, 2);
    arena.place({ pages: new Int32Array(0), offset: 0, view: undefined }, INITIAL_ENTRIES, 0); // packs: every slot moves
    expect(slot.view).toBeUndefined();
    slot.view = slot.pages.subarray(0, 2);
    arena.place(slot, 8, 4);
    expect(slot.view).toBeUndefined();
  });
});

describe('PagedKVCache over its arena', () => {
  it('keeps the page lists of the sequences an operation does not touch while others grow, fork and go away', () => {
    using cache = new PagedKVCache({ layers: 1, numPages: 4096, pageSize: 1, kvHeads: 1, headDim: 1, dtype: 'f32' });
    const random = rng(7);
    const live: number[] = [];
    for (let round = 0; round < 400; round++) {
      const before = new Map(live.map((seq) => [seq, [...cache.info(seq).pages]]));
      const touched = new Set<number>();
      const pick = () => live[Math.floor(random() * live.length)]!;
      const r = random();
      if (live.length < 4 || r < 0.15) {
        live.push(cache.addSequence());
      } else if (r < 0.55 && cache.stats().free > 1024) {
        const batch = live.filter(() => random() < 0.5);
        if (batch.length === 0) continue;
        using step = cache.beginStep(batch.map((seq) => ({ seq, tokens: 1 + Math.floor(random() * 6) })));
        using k = Tensor.zeros([step.slots.length, 1, 1]);
        using v = Tensor.zeros([step.slots.length, 1, 1]);
        step.append(0, k, v);
        batch.forEach((seq) => touched.add(seq));
      } else if (r < 0.7) {
        live.push(cache.fork(pick()));
      } else if (r < 0.85 && live.length < 24) {
        const seq = pick();
        cache.truncate(seq, Math.floor(random() * (cache.info(seq).length + 1)));
        touched.add(seq);
      } else {
        const seq = pick();
        cache.free(seq);
        live.splice(live.indexOf(seq), 1);
      }
      for (const [seq, pages] of before) if (live.includes(seq) && !touched.has(seq)) expect([...cache.info(seq).pages]).toEqual(pages);
      const holding = live.filter((seq) => cache.info(seq).length > 0);
      if (holding.length > 0) expect(keptTable(cache, holding)).toEqual(expectedTable(cache, holding));
    }
    expect(cache.stats().sequences).toBe(live.length);
  });
});
