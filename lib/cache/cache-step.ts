import { invalid } from '../errors';
import { appendPagedKV, KVPages } from '../ops/attention';
import { StagedPageTable } from '../ops/page-table';
import { QuantizedKVPages, TailPages } from '../ops/quant';
import { Tensor } from '../tensor';
import type { PagedKVCache } from './paged-kv-cache';
import { Sequence, WriteItem } from './sequence';

/**
 * One step's growth of a batch of sequences: the page table (staged once on the device, shared by
 * every layer) and where each new token goes. Valid until the cache next changes its page lists.
 */
export class CacheStep {
  readonly seqIds: readonly number[];
  /** The step's page table, on the cache's device (cache.pageTable(seqIds) gives it on the host). */
  readonly table: StagedPageTable;
  /** Offsets of each sequence's new tokens in the step's rows: [B + 1]. */
  readonly cuSeqlensQ: Int32Array;
  /** For each new token, its row in the page table (sequence index) and its slot in the sequence. */
  readonly batchIndices: Int32Array;
  readonly slots: Int32Array;
  /** Absolute position of each new token (for rotary embeddings). */
  readonly positions: Int32Array;
  readonly #cache: PagedKVCache;
  readonly #states: Sequence[];
  readonly #version: number;
  readonly #layersWritten: Uint8Array;
  /** Quantized caches: each sequence's rows, and the tail-pool append table shared by the layers. */
  readonly #items: WriteItem[];
  readonly #tailTable: { table?: StagedPageTable } = {};

  /** @internal Made by PagedKVCache.beginStep. */
  constructor(cache: PagedKVCache, states: Sequence[], seqIds: number[], table: StagedPageTable, starts: number[], version: number) {
    this.#cache = cache;
    this.#states = states;
    this.#version = version;
    this.#layersWritten = new Uint8Array(cache.layers);
    this.seqIds = Object.freeze(seqIds);
    this.table = table;
    this.cuSeqlensQ = new Int32Array(states.length + 1);
    states.forEach((s, b) => (this.cuSeqlensQ[b + 1] = this.cuSeqlensQ[b]! + s.length - starts[b]!));
    const rows = this.cuSeqlensQ[states.length]!;
    this.batchIndices = new Int32Array(rows);
    this.slots = new Int32Array(rows);
    this.positions = new Int32Array(rows);
    states.forEach((s, b) => {
      const P = cache.pageSize;
      for (let r = this.cuSeqlensQ[b]!, slot = starts[b]!; r < this.cuSeqlensQ[b + 1]!; r++, slot++) {
        this.batchIndices[r] = b;
        this.slots[r] = slot;
        const page = Math.floor(slot / P);
        this.positions[r] = s.starts[page]! + slot - page * P;
      }
    });
    this.#items = cache.quant ? states.map((seq, b) => ({ seq, row: this.cuSeqlensQ[b]!, n: this.cuSeqlensQ[b + 1]! - this.cuSeqlensQ[b]!, from: starts[b]! })) : [];
  }

  /** The new tokens' keys and values for `layer`, k and v [cuSeqlensQ[B], kvHeads, headDim] in entry order. */
  append(layer: number, k: Tensor, v: Tensor): void {
    this.#cache.checkVersion(this.#version);
    const quantized = this.#cache.quant !== undefined;
    // Both check the layer; a quantized cache writes its tail pool (and quantizes the pages it passes) instead.
    const pages = quantized ? this.#cache.tailPages(layer) : this.#cache.pages(layer);
    if (this.#layersWritten[layer]) throw invalid('E_RANGE', 'layer', 'a layer this step has not written yet', layer);
    this.#cache.checkRows(k, v, this.slots.length);
    if (quantized) this.#cache.writeQuantized(layer, k, v, this.#items, this.#tailTable);
    else appendPagedKV(k, v, pages as KVPages, this.table, { batchIndices: this.batchIndices, positions: this.slots, questMeta: this.#cache.questMetaOrUndefined(layer) });
    this.#layersWritten[layer] = 1;
    for (const s of this.#states) {
      s.written[layer] = s.length;
      this.#cache.publish(s);
    }
  }

  pages(layer: number): KVPages {
    return this.#cache.pages(layer);
  }

  /** cache.quantizedPages(layer), for ops.quantizedPagedDecodeAttention / quantizedPagedPrefillAttention with tailPages(layer) and table. */
  quantizedPages(layer: number): QuantizedKVPages {
    return this.#cache.quantizedPages(layer);
  }

  tailPages(layer: number): TailPages {
    return this.#cache.tailPages(layer);
  }

  dispose(): void {
    this.table.dispose();
    this.#tailTable.table?.dispose();
    this.#tailTable.table = undefined;
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}
