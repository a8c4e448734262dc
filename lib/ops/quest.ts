/**
 * Quest: query-aware page selection for long-context decode (layouts in native/core/quest_params.h).
 *
 * Per page and KV head the cache keeps the channel-wise min and max of its keys (the metadata,
 * current through appendPagedKV's questMeta). questScores bounds q·k over each page from them;
 * topkPages keeps each sequence's last page and its budget - 1 best others, per KV head; the sparse
 * decode is pagedDecodeAttention over that selection. questDecodeAttention is the three as one op
 * (one kernel on the GPU).
 */
import { callNative } from '../errors';
import { native } from '../native';
import { Tensor } from '../tensor';
import { AttentionResult, DecodeOptions, defaultScale, KVPages, wrapResult } from './attention';
import { PageTable, StagedPageTable, withStagedTable } from './page-table';

/** Metadata storage for a layer's page pool: [numPages, 2, kvHeads, headDim] in the pool's dtype. */
export function createQuestMeta(kPages: Tensor): Tensor {
  const [numPages, , kvHeads, headDim] = kPages.shape as [number, number, number, number];
  return Tensor.empty([numPages, 2, kvHeads, headDim], { dtype: kPages.dtype, device: kPages.device as never });
}

/** Computes the metadata of every page the table lists from the keys now in them. */
export function buildQuestMeta(kPages: Tensor, meta: Tensor, table: PageTable | StagedPageTable): void {
  const handles = [kPages.handle(), meta.handle()] as const;
  withStagedTable(table, kPages.device, (staged) => callNative(() => native().buildQuestMeta(...handles, staged)));
}

/** Upper bounds of q·k per page entry of the table and KV head: f32 [nnz, kvHeads], max over each GQA group. */
export function questScores(q: Tensor, kPages: Tensor, meta: Tensor, table: PageTable | StagedPageTable): Tensor {
  const handles = [q.handle(), kPages.handle(), meta.handle()] as const;
  return withStagedTable(table, q.device, (staged) => {
    const scores = callNative(() => native().questScores(...handles, staged));
    return new Tensor(scores, 'f32', [staged.entries, kPages.shape[2]!], q.device);
  });
}

/**
 * A table with a row per (sequence, KV head): the sequence's last page plus the budgetPages - 1
 * highest-scoring others (earlier page first on ties), in page order; every page when they fit.
 */
export function topkPages(scores: Tensor, table: PageTable | StagedPageTable, budgetPages: number): StagedPageTable {
  const handle = scores.handle();
  const selected = withStagedTable(table, scores.device, (staged) => callNative(() => native().topkPages(handle, staged, budgetPages)));
  return new StagedPageTable(selected, scores.device as never);
}

/**
 * Quest's decode step in one op: for q [B, H, D], the decode of each KV head's query heads over the
 * sequence's last page and its budgetPages - 1 best other pages by questScores (all pages when they
 * fit), i.e. pagedDecodeAttention(q, pages, topkPages(questScores(q, pages.kPages, meta, table),
 * table, budgetPages)). On the GPU one kernel bounds, selects and decodes (GQA groups up to 16,
 * sequences up to 8193 pages; beyond, the three ops run). `splits` (GPU, tests and tuning) fixes the
 * kernel's blocks per (sequence, KV head).
 */
export function questDecodeAttention(q: Tensor, pages: KVPages, meta: Tensor, table: PageTable | StagedPageTable, budgetPages: number, opts: DecodeOptions = {}): AttentionResult {
  const handles = [q.handle(), pages.kPages.handle(), pages.vPages.handle()] as const;
  const metaHandle = meta.handle();
  const result = withStagedTable(table, q.device, (staged) =>
    callNative(() => native().questDecode(...handles, staged, metaHandle, budgetPages, opts.scale ?? defaultScale(q), opts.returnLse ?? false, opts.splits ?? 0)),
  );
  return wrapResult(q, result);
}
