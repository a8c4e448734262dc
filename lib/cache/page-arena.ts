/**
 * PageArena: the page lists of a cache's sequences, each a slot of one Int32Array.
 *
 * A page-table build gathers every row's page ids from this one buffer, given each slot's offset, in
 * one native call (copySegments); a list per sequence would take a TypedArray.set per row (~12 ns
 * each in V8). A sequence that grows or forks allocates no ArrayBuffer.
 *
 * Slots are taken from the top. A slot given up (its sequence outgrew it, or went away) is garbage
 * until the top reaches the end; then the live slots are packed, in the order they were last placed
 * (a step grows its batch in order), into a new buffer twice their size: the arena holds at most about
 * twice the most entries live at once, and packing costs O(1) per entry placed. Packing moves slots:
 * a slot's `pages` is only good until the next place() on the arena, so read it from the slot each
 * time. The old buffer is left as it was.
 */
export interface PageSlot {
  /** The slot's view of the arena, as long as its capacity, and where it starts in PageArena.data. */
  pages: Int32Array;
  offset: number;
  /** A view of the slot's first entries, kept between page-table builds (see copyPages); dropped when the slot moves. */
  view: Int32Array | undefined;
}

/** Entries of the first buffer: a few sequences' worth. */
const INITIAL_ENTRIES = 64;

export class PageArena {
  #data = new Int32Array(INITIAL_ENTRIES);
  #top = 0;
  /** Entries in live slots. */
  #held = 0;
  /** Live slots, in the order they were last placed (the order packing keeps). */
  readonly #slots = new Set<PageSlot>();

  /** The current buffer, which every live slot is a view of. */
  get data(): Int32Array {
    return this.#data;
  }

  /** Entries in the current buffer (live, garbage and free). */
  get size(): number {
    return this.#data.length;
  }

  /**
   * Gives `slot` a new place of `capacity` entries holding the first `keep` entries of `slot.pages` as
   * it is now (a slot not yet in the arena may point at another slot's view to start as its copy).
   */
  place(slot: PageSlot, capacity: number, keep: number): void {
    // Packing leaves the old buffer as it was, so this view still reads the entries to keep.
    const from = slot.pages;
    if (this.#slots.delete(slot)) this.#held -= from.length;
    if (this.#top + capacity > this.#data.length) this.pack(capacity);
    const pages = this.#data.subarray(this.#top, this.#top + capacity);
    if (keep > 0) pages.set(from.subarray(0, keep));
    slot.pages = pages;
    slot.offset = this.#top;
    slot.view = undefined;
    this.#top += capacity;
    this.#held += capacity;
    this.#slots.add(slot);
  }

  /** Gives up `slot`'s place (its sequence went away). */
  release(slot: PageSlot): void {
    if (this.#slots.delete(slot)) this.#held -= slot.pages.length;
  }

  /** Moves every live slot into a new buffer with room for `need` more entries. */
  private pack(need: number): void {
    const data = new Int32Array(Math.max(INITIAL_ENTRIES, 2 * (this.#held + need)));
    let top = 0;
    for (const slot of this.#slots) {
      const capacity = slot.pages.length;
      data.set(slot.pages, top);
      slot.pages = data.subarray(top, top + capacity);
      slot.offset = top;
      slot.view = undefined;
      top += capacity;
    }
    this.#data = data;
    this.#top = top;
  }
}
