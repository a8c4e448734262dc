/**
 * Page tables. A plain PageTable (three integer arrays) is checked and copied to the device on every
 * op; a StagedPageTable is checked and copied once, then shared by every layer and op of a step.
 */
import { callNative, errorAtCaller } from '../errors';
import { native, PageTableNativeHandle } from '../native';
import { DeviceName, Tensor } from '../tensor';
import { IntArray, toInt32Array } from './int-arrays';

/** CSR page table: sequence b owns pages indices[indptr[b] .. indptr[b+1]); its last page holds lastPageLen[b] tokens. */
export interface PageTable {
  indptr: IntArray;
  indices: IntArray;
  lastPageLen: IntArray;
}

export class StagedPageTable {
  /** Sequences in the table. */
  readonly batch: number;
  /** Most pages any one row has. */
  readonly maxPages: number;
  /** 1: a row per sequence. kvHeads: a row per (sequence, KV head), as Quest's top-k selects. */
  readonly rowsPerSequence: number;
  /** Page entries (indices) in the table. */
  readonly entries: number;
  /** 'cpu' or 'cuda:N'. */
  readonly device: string;
  #handle: PageTableNativeHandle | undefined;

  /** Checks `table` and copies it to `device` (or adopts a table an op made there). */
  constructor(table: PageTable | PageTableNativeHandle, device: DeviceName) {
    this.device = device === 'cuda' ? 'cuda:0' : device;
    if ('dispose' in table) {
      this.#handle = table;
    } else {
      const arrays = [toInt32Array(table.indptr, 'indptr'), toInt32Array(table.indices, 'indices'), toInt32Array(table.lastPageLen, 'lastPageLen')] as const;
      this.#handle = callNative(() => native().stagePageTable(...arrays, this.device));
    }
    this.batch = this.#handle.batch;
    this.maxPages = this.#handle.maxPages;
    this.rowsPerSequence = this.#handle.rowsPerSequence;
    this.entries = this.#handle.entries;
  }

  /** @internal */
  handle(): PageTableNativeHandle {
    if (!this.#handle) throw errorAtCaller('E_DISPOSED', 'Expected a live StagedPageTable but received a disposed one');
    return this.#handle;
  }

  /** The table as host arrays (waits for the device when an op built it there). */
  async toArrays(): Promise<{ indptr: Int32Array; indices: Int32Array; lastPageLen: Int32Array }> {
    const table = this.handle();
    const handles = callNative(() => native().pageTableArrays(table));
    const [indptr, indices, lastPageLen] = await Promise.all(
      handles.map(async (h, i) => {
        const t = new Tensor(h, 'i32', [[this.batch * this.rowsPerSequence + 1, this.entries, this.batch * this.rowsPerSequence][i]!], this.device);
        try {
          return (await t.toArray()) as Int32Array;
        } finally {
          t.dispose();
        }
      }),
    );
    return { indptr: indptr!, indices: indices!, lastPageLen: lastPageLen! };
  }

  dispose(): void {
    this.#handle?.dispose();
    this.#handle = undefined;
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}

/**
 * @internal dst[offsets[i], offsets[i+1]) = the entries of `src` from starts[i] on, for every segment i
 * (offsets from 0 to dst.length): a table's rows gathered from the page lists in one native call.
 */
export function copySegments(src: Int32Array, starts: Int32Array, dst: Int32Array, offsets: Int32Array): void {
  callNative(() => native().copySegments(src, starts, dst, offsets));
}

/** Runs `use` with `table` staged on `device`: as it is if already staged, else staged for this call only. */
export function withStagedTable<T>(table: PageTable | StagedPageTable, device: string, use: (handle: PageTableNativeHandle) => T): T {
  if (table instanceof StagedPageTable) return use(table.handle());
  const staged = new StagedPageTable(table, device as DeviceName);
  try {
    return use(staged.handle());
  } finally {
    staged.dispose();
  }
}
