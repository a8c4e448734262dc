/**
 * Attention over ragged batches and paged KV caches (layouts in native/core/attention_params.h).
 *
 * q [Nq, H, D]; k, v [Nk, Hkv, D]; pages [numPages, P, Hkv, D]; H % Hkv == 0 (GQA, any ratio).
 * Causal masks align queries to the end of their key sequence, so a chunk of new tokens attends to
 * its cached prefix. Index arrays are checked on the host before any kernel runs.
 */
import { callNative } from '../errors';
import { native, TensorHandle } from '../native';
import { Tensor } from '../tensor';
import { IntArray, toInt32Array } from './int-arrays';
import { PageTable, StagedPageTable, withStagedTable } from './page-table';

/** One layer's page pool: kPages and vPages [numPages, pageSize, kvHeads, headDim]. */
export interface KVPages {
  kPages: Tensor;
  vPages: Tensor;
}

export interface MaskOptions {
  /** Default true: query i of Sq sees keys up to position Sk - Sq + i. */
  causal?: boolean;
  /** Keys at most this far left of the query's position are seen; -1 (default) for no window. */
  windowLeft?: number;
  /** Multiplies q·k; default 1/sqrt(headDim). */
  scale?: number;
  /** Also return lse [Nq, H] (f32, natural log of the softmax denominator). */
  returnLse?: boolean;
}

export interface PrefillOptions extends MaskOptions {
  /** Row offsets of each sequence in q: [B+1], from 0 to Nq. */
  cuSeqlensQ: IntArray;
  /** Row offsets of each sequence in k and v: [B+1], from 0 to Nk. */
  cuSeqlensK: IntArray;
}

export interface PagedPrefillOptions extends MaskOptions {
  /** Row offsets of each sequence in q: [B+1], from 0 to Nq. The paged sequences already hold these tokens. */
  cuSeqlensQ: IntArray;
}

export interface DecodeOptions {
  scale?: number;
  returnLse?: boolean;
  /** GPU only: split each sequence this many ways (1..256) instead of the automatic choice; for tests and tuning. */
  splits?: number;
}

export interface AttentionResult {
  /** [Nq, H, D], q's dtype. */
  out: Tensor;
  /** [Nq, H] f32, when returnLse was set. */
  lse?: Tensor;
}

/** @internal The op's [out, lse?] handles as tensors shaped after q. */
export function wrapResult(q: Tensor, [out, lse]: [TensorHandle, TensorHandle | undefined]): AttentionResult {
  const result: AttentionResult = { out: new Tensor(out, q.dtype, q.shape, q.device) };
  if (lse) result.lse = new Tensor(lse, 'f32', [q.shape[0]!, q.shape[1]!], q.device);
  return result;
}

/** @internal 1/sqrt(headDim). */
export function defaultScale(q: Tensor): number {
  return 1 / Math.sqrt(q.shape[2] ?? 1);
}

/** @internal A prefill's causal, windowLeft, scale and returnLse arguments, defaults filled in. */
export function maskArgs(q: Tensor, opts: MaskOptions): readonly [boolean, number, number, boolean] {
  return [opts.causal ?? true, opts.windowLeft ?? -1, opts.scale ?? defaultScale(q), opts.returnLse ?? false];
}

/** Attention of a ragged batch of queries over a ragged batch of keys and values. */
export function prefillAttention(q: Tensor, k: Tensor, v: Tensor, opts: PrefillOptions): AttentionResult {
  const cuQ = toInt32Array(opts.cuSeqlensQ, 'cuSeqlensQ');
  const cuK = toInt32Array(opts.cuSeqlensK, 'cuSeqlensK');
  const handles = [q.handle(), k.handle(), v.handle()] as const;
  const result = callNative(() =>
    native().prefill(...handles, cuQ, cuK, ...maskArgs(q, opts)),
  );
  return wrapResult(q, result);
}

/** Queries attend to their sequence's paged KV, which already holds them (chunked prefill, prefix reuse). */
export function pagedPrefillAttention(q: Tensor, pages: KVPages, table: PageTable | StagedPageTable, opts: PagedPrefillOptions): AttentionResult {
  const cuQ = toInt32Array(opts.cuSeqlensQ, 'cuSeqlensQ');
  const handles = [q.handle(), pages.kPages.handle(), pages.vPages.handle()] as const;
  const result = withStagedTable(table, q.device, (staged) =>
    callNative(() => native().pagedPrefill(...handles, staged, cuQ, ...maskArgs(q, opts))),
  );
  return wrapResult(q, result);
}

/** One new token per sequence (q [B, H, D]) over its whole paged sequence. */
export function pagedDecodeAttention(q: Tensor, pages: KVPages, table: PageTable | StagedPageTable, opts: DecodeOptions = {}): AttentionResult {
  const handles = [q.handle(), pages.kPages.handle(), pages.vPages.handle()] as const;
  const result = withStagedTable(table, q.device, (staged) =>
    callNative(() => native().pagedDecode(...handles, staged, opts.scale ?? defaultScale(q), opts.returnLse ?? false, opts.splits ?? 0)),
  );
  return wrapResult(q, result);
}

export interface AttentionMassOptions {
  /** Row offsets of each sequence's queries in q: [B+1]. Default: one query per sequence (decode). */
  cuSeqlensQ?: IntArray;
  /** Default true: query i of Sq sees keys up to position Sk - Sq + i. */
  causal?: boolean;
  /** The scale the attention call used; default 1/sqrt(headDim). */
  scale?: number;
  /** 'page' (default): mass per page entry of the table, [nnz, kvHeads]; 'token': per cached token, [Σ lengths, kvHeads]. */
  per?: 'page' | 'token';
}

/**
 * The attention probability each cached page (or token) received from its sequence's queries,
 * summed over the query heads of each KV head: what H2O accumulates over decode steps and SnapKV
 * scores an observation window by. `lse` is the attention call's (returnLse: true) over the same
 * cache, so each query's masses sum to 1 over the keys it sees.
 */
export function attentionMass(q: Tensor, kPages: Tensor, table: PageTable | StagedPageTable, lse: Tensor, opts: AttentionMassOptions = {}): Tensor {
  const handles = [q.handle(), kPages.handle()] as const;
  const lseHandle = lse.handle();
  const cuQ = opts.cuSeqlensQ === undefined ? undefined : toInt32Array(opts.cuSeqlensQ, 'cuSeqlensQ');
  const perPage = (opts.per ?? 'page') === 'page';
  return withStagedTable(table, q.device, (staged) => {
    const offsets = cuQ ?? Int32Array.from({ length: staged.batch + 1 }, (_, i) => i);
    const [mass, rows] = callNative(() => native().attentionMass(...handles, staged, lseHandle, offsets, opts.causal ?? true, opts.scale ?? defaultScale(q), perPage));
    return new Tensor(mass, 'f32', [rows, kPages.shape[2]!], q.device);
  });
}

export interface AppendPositions {
  /** For each new token, the sequence (index into the page table) it belongs to. */
  batchIndices: IntArray;
  /** For each new token, its position in that sequence (the table already counts it). */
  positions: IntArray;
  /** The layer's Quest metadata (see ops.createQuestMeta), kept current for every page written to. */
  questMeta?: Tensor;
}

/** Writes new tokens' keys and values (k, v [N, Hkv, D]) into their pages, in place. */
export function appendPagedKV(k: Tensor, v: Tensor, pages: KVPages, table: PageTable | StagedPageTable, where: AppendPositions): void {
  const batchIndices = toInt32Array(where.batchIndices, 'batchIndices');
  const positions = toInt32Array(where.positions, 'positions');
  const handles = [k.handle(), v.handle(), pages.kPages.handle(), pages.vPages.handle()] as const;
  const meta = where.questMeta?.handle();
  withStagedTable(table, k.device, (staged) => callNative(() => native().appendPagedKV(...handles, staged, batchIndices, positions, meta)));
}
