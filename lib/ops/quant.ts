/**
 * Quantized KV-cache pages (formats and layouts in native/core/quant_format.h).
 *
 * - `fp8e4m3`: codes [numPages, P, Hkv, D] u8 (e4m3 bit patterns); kScale, vScale [numPages, Hkv] f16
 *   (amax / 448 per page and KV head).
 * - `int8`, `int4`, `int2` (KIVI, asymmetric): codes [numPages, P, Hkv, D*bits/8] u8, packed least-significant
 *   bits first; keys per channel over a page's tokens: kScale, kMin [numPages, Hkv, D] f16; values per token
 *   over groups of `groupSize` channels: vScale, vMin [numPages, P, Hkv, D/groupSize] f16.
 *
 * The last page of every sequence stays in full precision in a tail pool (kTail, vTail [numTail, P, Hkv, D]):
 * in the page table given to `quantizedPagedDecodeAttention` and `quantizedPagedPrefillAttention`, the last
 * index of each sequence names a tail page and every other index a quantized page. A full tail page is quantized with `quantizePages`.
 * NaN inputs quantize as 0 and values beyond ±65504 (infinities too) saturate to ±65504.
 */
import { callNative, invalid } from '../errors';
import { native, TensorHandle } from '../native';
import { DeviceName, Tensor } from '../tensor';
import { defaultScale, maskArgs, wrapResult } from './attention';
import type { AttentionResult, DecodeOptions, PagedPrefillOptions } from './attention';
import { IntArray, toInt32Array } from './int-arrays';
import { PageTable, StagedPageTable, withStagedTable } from './page-table';

export type QuantFormat = 'fp8e4m3' | 'int8' | 'int4' | 'int2';

/** One layer's quantized pages. kMin and vMin are absent for fp8e4m3. */
export interface QuantizedKVPages {
  format: QuantFormat;
  /** Channels per value group (integer formats): 32 (default), 64 or 128. */
  groupSize: number;
  kCodes: Tensor;
  vCodes: Tensor;
  kScale: Tensor;
  kMin?: Tensor;
  vScale: Tensor;
  vMin?: Tensor;
}

/** The full-precision tail pool: kTail, vTail [numTail, P, Hkv, D]. */
export interface TailPages {
  kTail: Tensor;
  vTail: Tensor;
}

export interface QuantizedLayerOptions {
  format: QuantFormat;
  groupSize?: number;
  device?: DeviceName;
}

const BITS: Record<QuantFormat, number> = { fp8e4m3: 8, int8: 8, int4: 4, int2: 2 };

/** Bits per code of a format. */
export function quantBits(format: QuantFormat): number {
  const bits = BITS[format];
  if (bits === undefined) throw invalid('E_RANGE', 'format', "'fp8e4m3', 'int8', 'int4' or 'int2'", format);
  return bits;
}

/** Allocates (uninitialised) quantized pages for numPages pages of pageSize tokens, kvHeads heads of headDim. */
export function createQuantizedPages(numPages: number, pageSize: number, kvHeads: number, headDim: number, opts: QuantizedLayerOptions): QuantizedKVPages {
  const bits = quantBits(opts.format);
  const groupSize = opts.groupSize ?? 32;
  const device = opts.device ?? 'cpu';
  if (!Number.isInteger(headDim) || headDim <= 0 || (headDim * bits) % 8 !== 0) throw invalid('E_SHAPE', 'headDim', `a positive integer with headDim * ${bits} a multiple of 8`, headDim);
  const rowBytes = (headDim * bits) / 8;
  const codes = { dtype: 'u8', device } as const;
  const stats = { dtype: 'f16', device } as const;
  const kCodes = Tensor.empty([numPages, pageSize, kvHeads, rowBytes], codes);
  const vCodes = Tensor.empty([numPages, pageSize, kvHeads, rowBytes], codes);
  if (opts.format === 'fp8e4m3') {
    return { format: opts.format, groupSize, kCodes, vCodes, kScale: Tensor.empty([numPages, kvHeads], stats), vScale: Tensor.empty([numPages, kvHeads], stats) };
  }
  if (![32, 64, 128].includes(groupSize)) throw invalid('E_RANGE', 'groupSize', '32, 64 or 128', groupSize);
  if (headDim % groupSize !== 0) throw invalid('E_SHAPE', 'headDim', `a multiple of groupSize ${groupSize}`, headDim);
  return {
    format: opts.format,
    groupSize,
    kCodes,
    vCodes,
    kScale: Tensor.empty([numPages, kvHeads, headDim], stats),
    kMin: Tensor.empty([numPages, kvHeads, headDim], stats),
    vScale: Tensor.empty([numPages, pageSize, kvHeads, headDim / groupSize], stats),
    vMin: Tensor.empty([numPages, pageSize, kvHeads, headDim / groupSize], stats),
  };
}

/** Disposes every tensor of a quantized layer. */
export function disposeQuantizedPages(q: QuantizedKVPages): void {
  for (const t of [q.kCodes, q.vCodes, q.kScale, q.kMin, q.vScale, q.vMin]) t?.dispose();
}

type LayerHandles = [string, number, TensorHandle, TensorHandle, TensorHandle, TensorHandle | undefined, TensorHandle, TensorHandle | undefined];

function layerHandles(q: QuantizedKVPages): LayerHandles {
  return [q.format, q.groupSize ?? 32, q.kCodes.handle(), q.vCodes.handle(), q.kScale.handle(), q.kMin?.handle(), q.vScale.handle(), q.vMin?.handle()];
}

/** @internal The head dim of a quantized layer, from its packed key codes. */
export function headDimOf(q: QuantizedKVPages): number {
  return (q.kCodes.shape[3]! * 8) / quantBits(q.format);
}

export interface QuantizePagesArgs {
  /** Full-precision source pools kSrc, vSrc [numSrc, P, Hkv, D]. */
  kSrc: Tensor;
  vSrc: Tensor;
  /** Source page of each page to quantize. */
  srcPages: IntArray;
  /** Quantized page each is written to (distinct). */
  dstPages: IntArray;
  /**
   * Quest metadata of the quantized layer (createQuestMeta(quant, { dtype: kSrc.dtype })): each
   * destination page's min and max keys are recorded too, from the source keys before quantization.
   */
  questMeta?: Tensor;
}

/** Quantizes whole source pages into pages of `dst`, in place (every slot of each page, all P tokens). */
export function quantizePages(args: QuantizePagesArgs, dst: QuantizedKVPages): void {
  const src = toInt32Array(args.srcPages, 'srcPages');
  const dstPages = toInt32Array(args.dstPages, 'dstPages');
  const handles = [args.kSrc.handle(), args.vSrc.handle()] as const;
  const layer = layerHandles(dst);
  const meta = args.questMeta?.handle();
  callNative(() => native().quantizePages(...handles, src, dstPages, ...layer, meta));
}

/** Reconstructs pages of `src` as k, v [pages.length, P, Hkv, D] of `dtype` (default f32). For tests and tools. */
export function dequantizePages(src: QuantizedKVPages, pages: IntArray, dtype: 'f32' | 'bf16' | 'f16' = 'f32'): { k: Tensor; v: Tensor } {
  const list = toInt32Array(pages, 'pages');
  const layer = layerHandles(src);
  const [k, v] = callNative(() => native().dequantizePages(...layer, list, dtype));
  const shape = [list.length, src.kCodes.shape[1]!, src.kCodes.shape[2]!, headDimOf(src)];
  const device = src.kCodes.device;
  return { k: new Tensor(k, dtype, shape, device), v: new Tensor(v, dtype, shape, device) };
}

/**
 * One new token per sequence (q [B, H, D]) over its quantized pages and its full-precision last page; the
 * codes are dequantized inside the attention loop. The table has a row per sequence, or a row per
 * (sequence, KV head) as topkPages selects them (each row still ending at the sequence's tail page), so a
 * per-head page selection decodes over quantized pages without gathering them.
 */
export function quantizedPagedDecodeAttention(q: Tensor, quant: QuantizedKVPages, tail: TailPages, table: PageTable | StagedPageTable, opts: DecodeOptions = {}): AttentionResult {
  const qh = q.handle();
  const layer = layerHandles(quant);
  const tails = [tail.kTail.handle(), tail.vTail.handle()] as const;
  const scale = opts.scale ?? defaultScale(q);
  const result = withStagedTable(table, q.device, (staged) =>
    callNative(() => native().quantizedPagedDecode(qh, ...layer, ...tails, staged, scale, opts.returnLse ?? false)),
  );
  return wrapResult(q, result);
}

/**
 * Chunked prefill over a quantized layer: queries (ragged by cuSeqlensQ, aligned to the end of their
 * sequence, which already holds them) attend to their quantized pages and full-precision last page, with
 * the options of pagedPrefillAttention. The codes are dequantized tile by tile inside the attention loop.
 */
export function quantizedPagedPrefillAttention(q: Tensor, quant: QuantizedKVPages, tail: TailPages, table: PageTable | StagedPageTable, opts: PagedPrefillOptions): AttentionResult {
  const cuQ = toInt32Array(opts.cuSeqlensQ, 'cuSeqlensQ');
  const qh = q.handle();
  const layer = layerHandles(quant);
  const tails = [tail.kTail.handle(), tail.vTail.handle()] as const;
  const result = withStagedTable(table, q.device, (staged) =>
    callNative(() => native().quantizedPagedPrefill(qh, ...layer, ...tails, staged, cuQ, ...maskArgs(q, opts))),
  );
  return wrapResult(q, result);
}
