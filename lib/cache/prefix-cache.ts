/**
 * PrefixCache: full pages remembered by the tokens that led to them, so that a new sequence with a
 * known prompt prefix reuses those pages instead of recomputing them.
 *
 * A page is keyed by a hash chain: its parent's key plus its own token ids, so a key names the whole
 * prefix up to and including that page. The cache holds one reference on every page it remembers;
 * a page no sequence references any more stays until eviction needs it, least recently used first
 * and always the tail of a chain before its parent (a parent is only dropped once it is a leaf).
 */
import { BlockAllocator } from './block-allocator';

export interface PrefixCacheStats {
  /** Pages the cache remembers. */
  pages: number;
  /** Full prompt pages found in the cache by addSequence. */
  hits: number;
  /** Full prompt pages looked up and not found. */
  misses: number;
  /** Pages dropped to make room. */
  evictions: number;
}

interface Node {
  readonly key: string;
  readonly id: number;
  readonly parent: Node | undefined;
  readonly page: number;
  readonly children: Set<Node>;
  lastUsed: number;
}

export class PrefixCache {
  readonly pageSize: number;
  readonly #allocator: BlockAllocator;
  readonly #nodes = new Map<string, Node>();
  #nextId = 1;
  #clock = 0;
  #hits = 0;
  #misses = 0;
  #evictions = 0;

  constructor(allocator: BlockAllocator, pageSize: number) {
    this.#allocator = allocator;
    this.pageSize = pageSize;
  }

  /**
   * The pages of the longest cached prefix of `tokens`, at most `maxPages` of them, each retained
   * once for the caller. Every full page of `tokens` up to maxPages counts as a hit or a miss.
   */
  match(tokens: Int32Array, maxPages: number): number[] {
    const pages: number[] = [];
    let parent: Node | undefined;
    const lookups = Math.min(maxPages, Math.floor(tokens.length / this.pageSize));
    for (let p = 0; p < lookups; p++) {
      const node = this.#nodes.get(this.keyOf(parent, tokens, p));
      if (!node) break;
      node.lastUsed = ++this.#clock;
      this.#allocator.retain(node.page);
      pages.push(node.page);
      parent = node;
    }
    this.#hits += pages.length;
    this.#misses += lookups - pages.length;
    return pages;
  }

  /**
   * Remembers pages[i] as holding tokens [i * pageSize, (i + 1) * pageSize); every page must be full.
   * A prefix already cached under another page keeps that page. Returns the pages newly remembered.
   */
  insert(tokens: Int32Array, pages: ArrayLike<number>): number {
    let parent: Node | undefined;
    let added = 0;
    for (let p = 0; p < pages.length; p++) {
      const key = this.keyOf(parent, tokens, p);
      let node = this.#nodes.get(key);
      if (!node) {
        node = { key, id: this.#nextId++, parent, page: pages[p]!, children: new Set(), lastUsed: 0 };
        this.#allocator.retain(node.page);
        this.#nodes.set(key, node);
        parent?.children.add(node);
        added++;
      }
      node.lastUsed = ++this.#clock;
      parent = node;
    }
    return added;
  }

  /** Pages evict() could free now: those in chains no sequence references from that page on. */
  get evictable(): number {
    let count = 0;
    for (const node of this.#nodes.values()) if (this.freeSubtree(node)) count++;
    return count;
  }

  /** Frees up to `count` unreferenced pages, least recently used leaf first; returns how many. */
  evict(count: number): number {
    const queue = [...this.#nodes.values()].filter((n) => n.children.size === 0 && this.unreferenced(n));
    queue.sort((a, b) => b.lastUsed - a.lastUsed);
    let freed = 0;
    while (freed < count && queue.length > 0) {
      const node = queue.pop()!;
      this.drop(node);
      freed++;
      const parent = node.parent;
      if (parent && parent.children.size === 0 && this.unreferenced(parent)) {
        // Keep the queue ordered newest first so that pop() yields the least recently used.
        let at = queue.findIndex((n) => n.lastUsed < parent.lastUsed);
        if (at < 0) at = queue.length;
        queue.splice(at, 0, parent);
      }
    }
    this.#evictions += freed;
    return freed;
  }

  /** Releases every page the cache holds (pages still used by sequences stay theirs). */
  clear(): void {
    for (const node of this.#nodes.values()) this.#allocator.release(node.page);
    this.#nodes.clear();
  }

  /** The pages the cache remembers (each holds one reference from the cache). */
  cachedPages(): Int32Array {
    return Int32Array.from(this.#nodes.values(), (node) => node.page);
  }

  stats(): PrefixCacheStats {
    return { pages: this.#nodes.size, hits: this.#hits, misses: this.#misses, evictions: this.#evictions };
  }

  private keyOf(parent: Node | undefined, tokens: Int32Array, page: number): string {
    return `${parent?.id ?? 0}:${tokens.subarray(page * this.pageSize, (page + 1) * this.pageSize).join(',')}`;
  }

  private unreferenced(node: Node): boolean {
    return this.#allocator.refCount(node.page) === 1;
  }

  private freeSubtree(node: Node): boolean {
    if (!this.unreferenced(node)) return false;
    for (const child of node.children) if (!this.freeSubtree(child)) return false;
    return true;
  }

  private drop(node: Node): void {
    this.#nodes.delete(node.key);
    node.parent?.children.delete(node);
    this.#allocator.release(node.page);
  }
}
