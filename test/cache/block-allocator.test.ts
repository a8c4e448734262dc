// BlockAllocator: the free list and reference counts against a plain model, and its refusals.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';

import { BlockAllocator } from '../../lib/cache/index';
import { KvflashError } from '../../lib/index';

describe('BlockAllocator', () => {
  it('hands out every page once, counts owners and keeps the high-water mark', () => {
    const allocator = new BlockAllocator(4);
    const pages = [allocator.allocate(), allocator.allocate(), allocator.allocate()];
    expect(new Set(pages).size).toBe(3);
    allocator.retain(pages[0]!);
    expect(allocator.stats()).toEqual({ capacity: 4, used: 3, free: 1, shared: 1, highWater: 3 });
    expect(allocator.release(pages[0]!)).toBe(false);
    expect(allocator.release(pages[0]!)).toBe(true);
    expect(allocator.release(pages[1]!)).toBe(true);
    expect(allocator.stats()).toEqual({ capacity: 4, used: 1, free: 3, shared: 0, highWater: 3 });
    expect(allocator.refCount(pages[2]!)).toBe(1);
  });

  it('refuses an empty pool with E_OOM carrying its stats, and allocateMany is all or nothing', () => {
    const allocator = new BlockAllocator(3);
    allocator.allocate();
    const error = (() => {
      try {
        allocator.allocateMany(3);
      } catch (e) {
        return e as KvflashError & { stats: unknown };
      }
    })();
    expect(error).toBeInstanceOf(KvflashError);
    expect(error!.code).toBe('E_OOM');
    expect(error!.stats).toEqual({ capacity: 3, used: 1, free: 2, shared: 0, highWater: 1 });
    expect(allocator.freeCount).toBe(2);
    expect(allocator.allocateMany(2)).toHaveLength(2);
    expect(() => allocator.allocate()).toThrow(expect.objectContaining({ code: 'E_OOM' }));
  });

  it('names the argument on bad input and changes nothing', () => {
    expect(() => new BlockAllocator(0)).toThrow('Expected positive integer for capacity but received 0 of type number');
    const allocator = new BlockAllocator(2);
    const page = allocator.allocate();
    expect(() => allocator.release(1)).toThrow(expect.objectContaining({ code: 'E_RANGE', message: 'Expected a page in use for block but received 1 of type number' }));
    expect(() => allocator.retain(7)).toThrow(expect.objectContaining({ code: 'E_RANGE' }));
    expect(() => allocator.refCount(-1)).toThrow(expect.objectContaining({ code: 'E_RANGE' }));
    allocator.release(page);
    expect(() => allocator.release(page)).toThrow(expect.objectContaining({ code: 'E_RANGE' }));
    expect(allocator.stats()).toMatchObject({ used: 0, free: 2 });
  });

  it('agrees with a model of reference counts under random operations', () => {
    const op = fc.oneof(
      fc.constant({ kind: 'allocate' as const, pick: 0 }),
      fc.record({ kind: fc.constant('retain' as const), pick: fc.nat() }),
      fc.record({ kind: fc.constant('release' as const), pick: fc.nat() }),
    );
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 8 }), fc.array(op, { maxLength: 60 }), (capacity, ops) => {
        const allocator = new BlockAllocator(capacity);
        const model = new Map<number, number>();
        let highWater = 0;
        for (const { kind, pick } of ops) {
          const used = [...model.keys()];
          if (kind === 'allocate') {
            if (model.size === capacity) {
              expect(() => allocator.allocate()).toThrow(expect.objectContaining({ code: 'E_OOM' }));
              continue;
            }
            const page = allocator.allocate();
            expect(model.has(page)).toBe(false);
            model.set(page, 1);
          } else if (used.length > 0) {
            const page = used[pick % used.length]!;
            if (kind === 'retain') {
              allocator.retain(page);
              model.set(page, model.get(page)! + 1);
            } else {
              const freed = allocator.release(page);
              const count = model.get(page)! - 1;
              expect(freed).toBe(count === 0);
              if (count === 0) model.delete(page);
              else model.set(page, count);
            }
          }
          highWater = Math.max(highWater, model.size);
          for (let p = 0; p < capacity; p++) expect(allocator.refCount(p)).toBe(model.get(p) ?? 0);
          const shared = [...model.values()].filter((c) => c > 1).length;
          expect(allocator.stats()).toEqual({ capacity, used: model.size, free: capacity - model.size, shared, highWater });
        }
      }),
      { numRuns: 200 },
    );
  });
});
