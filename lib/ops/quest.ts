/**
 * Quest: query-aware page selection for long-context decode (layouts in native/core/quest_params.h).
 *
 * Per page and KV head the cache keeps the channel-wise min and max of its keys (the metadata,
 * current through appendPagedKV's questMeta). questScores bounds q·k over each page from them;
 * topkPages keeps each sequence's last page and its budget - 1 best others, per KV head; the sparse
 * decode is pagedDecodeAttention over that selection. questDecodeAttention is the three as one op
 * (one kernel on the GPU).
 */
import type { DType } from '../dtype';
import { callNative, invalid } from '../errors';
import { native } from '../native';
import { Tensor } from '../tensor';
import { AttentionResult, DecodeOptions, defaultScale, KVPages, wrapResult } from './attention';
import { PageTable, StagedPageTable, withStagedTable } from './page-table';
import { headDimOf, QuantizedKVPages } from './quant';

/**
 * Metadata storage for a layer: [numPages, 2, kvHeads, headDim], in the pool's dtype for a page pool;
 * for a quantized layer in `opts.dtype`, its full-precision keys' (quantizePages fills it).
 */
export function createQuestMeta(kPages: Tensor): Tensor;
export function createQuestMeta(quant: QuantizedKVPages, opts: { dtype: DType }): Tensor;
export function createQuestMeta(layer: Tensor | QuantizedKVPages, opts?: { dtype: DType }): Tensor {
  if (layer instanceof Tensor) {
    const [numPages, , kvHeads, headDim] = layer.shape as [number, number, number, number];
    return Tensor.empty([numPages, 2, kvHeads, headDim], { dtype: layer.dtype, device: layer.device as never });
  }
  if (!opts?.dtype) throw invalid('E_DTYPE', 'opts.dtype', 'the dtype of the keys a quantized layer is made from', opts?.dtype);
  const [numPages, , kvHeads] = layer.kCodes.shape as [number, number, number, number];
  return Tensor.empty([numPages, 2, kvHeads, headDimOf(layer)], { dtype: opts.dtype, device: layer.kCodes.device as never });
}

/** Computes the metadata of every page the table lists from the keys now in them. */
export function buildQuestMeta(kPages: Tensor, meta: Tensor, table: PageTable | StagedPageTable): void {
  const handles = [kPages.handle(), meta.handle()] as const;
  withStagedTable(table, kPages.device, (staged) => callNative(() => native().buildQuestMeta(...handles, staged)));
}

/**
 * Upper bounds of q·k per page entry of the table and KV head: f32 [nnz, kvHeads], max over each GQA
 * group. Over a quantized layer (the table's rows ending at their tail page, as for
 * quantizedPagedDecodeAttention) the tail pages have no metadata and score +Infinity; topkPages keeps
 * them anyway.
 */
export function questScores(q: Tensor, layer: Tensor | QuantizedKVPages, meta: Tensor, table: PageTable | StagedPageTable): Tensor {
  const handles = [q.handle(), layer instanceof Tensor ? layer.handle() : null, meta.handle()] as const;
  return withStagedTable(table, q.device, (staged) => {
    const scores = callNative(() => native().questScores(...handles, staged));
    return new Tensor(scores, 'f32', [staged.entries, meta.shape[2]!], q.device);
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
