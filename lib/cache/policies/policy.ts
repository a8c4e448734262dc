/**
 * Eviction policies choose whole pages to drop from a sequence. They are pure: they read a view of
 * the sequence and name page slots; the cache does the dropping, so every policy keeps the page
 * table, the reference counts and the token positions consistent in the same way.
 */

/** A sequence as a policy sees it. Slots index the sequence's page list, oldest first. */
export interface SequenceView {
  readonly pageSize: number;
  /** Pages the sequence will hold once the pending growth is in place (new pages included). */
  readonly pagesAfter: number;
  /**
   * Slots [0, evictable) are full and written on every layer, so they may be dropped; later slots
   * (the partial last page, pages being written) never are.
   */
  readonly evictable: number;
  /** Attention mass accumulated per slot (cache.recordAttentionMass), for the evictable slots at least. */
  readonly mass: Float64Array;
}

/** Observation-window scores, one Float32Array per KV head with one score per cached token. */
export type ObservationScores = readonly Float32Array[];

export interface Compression {
  /** Slots to drop, ascending. */
  evict: Int32Array;
  /** For each KV head, the slots (of the page list before dropping) it attends to, ascending. */
  headSlots: Int32Array[];
}

export interface EvictionPolicy {
  readonly name: string;
  /** Slots to drop, ascending, before the sequence grows to view.pagesAfter pages. */
  onGrow(view: SequenceView): Int32Array;
  /** One-shot compression from observation scores (SnapKV); absent where a policy has none. */
  compress?(view: SequenceView, scores: ObservationScores): Compression;
}

/** Slots in [from, to) as an ascending Int32Array (empty when to <= from). */
export function slotRange(from: number, to: number): Int32Array {
  return Int32Array.from({ length: Math.max(0, to - from) }, (_, i) => from + i);
}
