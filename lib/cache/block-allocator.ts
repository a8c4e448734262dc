/**
 * BlockAllocator: a fixed pool of page ids with a free list and reference counts.
 *
 * It owns no memory, only the bookkeeping: a page is "used" while its count is above zero and
 * "shared" while more than one owner (sequences, the prefix cache) holds it.
 */
import { errorAtCaller, invalid, KvflashError } from '../errors';

export interface AllocatorStats {
  /** Pages in the pool. */
  capacity: number;
  /** Pages with at least one reference. */
  used: number;
  free: number;
  /** Pages with more than one reference. */
  shared: number;
  /** Most pages ever used at once. */
  highWater: number;
}

export function checkPositiveInteger(value: unknown, name: string, max = 2 ** 31 - 1): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 1 || value > max) {
    throw invalid('E_RANGE', name, max === 2 ** 31 - 1 ? 'positive integer' : `integer in [1, ${max}]`, value);
  }
  return value;
}

export class BlockAllocator {
  readonly capacity: number;
  // A stack of free ids: allocation and release are O(1) with no garbage.
  readonly #freeList: Int32Array;
  #freeCount: number;
  readonly #refCounts: Int32Array;
  #shared = 0;
  #highWater = 0;

  constructor(capacity: number) {
    this.capacity = checkPositiveInteger(capacity, 'capacity');
    this.#freeList = new Int32Array(capacity);
    // Low ids come out first, which keeps tests and page tables easy to read.
    for (let i = 0; i < capacity; i++) this.#freeList[i] = capacity - 1 - i;
    this.#freeCount = capacity;
    this.#refCounts = new Int32Array(capacity);
  }

  get freeCount(): number {
    return this.#freeCount;
  }

  /** One page with a count of one; E_OOM (with the stats) when none is free. */
  allocate(): number {
    if (this.#freeCount === 0) throw this.outOfPages(1);
    const block = this.#freeList[--this.#freeCount]!;
    this.#refCounts[block] = 1;
    const used = this.capacity - this.#freeCount;
    if (used > this.#highWater) this.#highWater = used;
    return block;
  }

  /** `count` pages, all or none. */
  allocateMany(count: number): Int32Array {
    if (!Number.isInteger(count) || count < 0) throw invalid('E_RANGE', 'count', 'non-negative integer', count);
    if (count > this.#freeCount) throw this.outOfPages(count);
    const blocks = new Int32Array(count);
    for (let i = 0; i < count; i++) blocks[i] = this.allocate();
    return blocks;
  }

  /** One more owner for a used page. */
  retain(block: number): void {
    const count = this.#refCounts[this.checkUsed(block)]!;
    if (count === 1) this.#shared++;
    this.#refCounts[block] = count + 1;
  }

  /** One owner fewer; returns true when that freed the page. */
  release(block: number): boolean {
    const count = this.#refCounts[this.checkUsed(block)]!;
    this.#refCounts[block] = count - 1;
    if (count === 2) this.#shared--;
    if (count > 1) return false;
    this.#freeList[this.#freeCount++] = block;
    return true;
  }

  refCount(block: number): number {
    if (!Number.isInteger(block) || block < 0 || block >= this.capacity) throw invalid('E_RANGE', 'block', `page id in [0, ${this.capacity})`, block);
    return this.#refCounts[block]!;
  }

  stats(): AllocatorStats {
    const used = this.capacity - this.#freeCount;
    return { capacity: this.capacity, used, free: this.#freeCount, shared: this.#shared, highWater: this.#highWater };
  }

  /** The E_OOM for a request of `requested` pages, carrying the stats at that moment. */
  outOfPages(requested: number, stats: object = this.stats()): KvflashError {
    const error = errorAtCaller('E_OOM', `Expected ${requested} free page(s) but the pool has ${this.#freeCount} free of ${this.capacity} (${JSON.stringify(stats)})`);
    return Object.assign(error, { stats });
  }

  private checkUsed(block: number): number {
    if (!Number.isInteger(block) || block < 0 || block >= this.capacity) throw invalid('E_RANGE', 'block', `page id in [0, ${this.capacity})`, block);
    if (this.#refCounts[block] === 0) throw invalid('E_RANGE', 'block', 'a page in use', block);
    return block;
  }
}
