/**
 * Page tables. A plain PageTable (three integer arrays) is checked and copied to the device on every
 * op; a StagedPageTable is checked and copied once, then shared by every layer and op of a step.
 */
import { callNative, errorAtCaller } from '../errors';
import { native, PageTableNativeHandle } from '../native';
import type { DeviceName } from '../tensor';
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
  /** Most pages any one sequence has. */
  readonly maxPages: number;
  /** 'cpu' or 'cuda:N'. */
  readonly device: string;
  #handle: PageTableNativeHandle | undefined;

  /** Checks `table` and copies it to `device`. */
  constructor(table: PageTable, device: DeviceName) {
    this.device = device === 'cuda' ? 'cuda:0' : device;
    const arrays = [toInt32Array(table.indptr, 'indptr'), toInt32Array(table.indices, 'indices'), toInt32Array(table.lastPageLen, 'lastPageLen')] as const;
    this.#handle = callNative(() => native().stagePageTable(...arrays, this.device));
    this.batch = this.#handle.batch;
    this.maxPages = this.#handle.maxPages;
  }

  /** @internal */
  handle(): PageTableNativeHandle {
    if (!this.#handle) throw errorAtCaller('E_DISPOSED', 'Expected a live StagedPageTable but received a disposed one');
    return this.#handle;
  }

  dispose(): void {
    this.#handle?.dispose();
    this.#handle = undefined;
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
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
