/** The quant option of PagedKVCache, checked before any memory is taken. */
import { DType } from '../dtype';
import { errorAtCaller, invalid } from '../errors';
import { QuantFormat, quantBits } from '../ops/quant';

export interface QuantizedCacheOptions {
  format: QuantFormat;
  /** Channels per value group of the integer formats: 32 (default), 64 or 128. */
  groupSize?: number;
}

const QUANT_FORMATS: readonly string[] = ['fp8e4m3', 'int8', 'int4', 'int2'];

/** The quant option checked against the cache's dtype and head dim, before any memory is taken. */
export function checkQuant(quant: unknown, dtype: DType, headDim: number): Readonly<Required<QuantizedCacheOptions>> {
  if (quant === null || typeof quant !== 'object' || Array.isArray(quant)) throw invalid('E_RANGE', 'quant', 'an object { format, groupSize? }', quant);
  for (const key of Object.keys(quant)) {
    if (key !== 'format' && key !== 'groupSize') throw errorAtCaller('E_UNSUPPORTED', `Expected quant options format and groupSize but received quant.${key}, which PagedKVCache does not support`);
  }
  const { format, groupSize } = quant as Partial<QuantizedCacheOptions>;
  if (typeof format !== 'string' || !QUANT_FORMATS.includes(format)) throw invalid('E_RANGE', 'quant.format', "'fp8e4m3', 'int8', 'int4' or 'int2'", format);
  if (dtype !== 'f32' && dtype !== 'f16' && dtype !== 'bf16') throw invalid('E_DTYPE', 'dtype', 'f32, f16 or bf16 (the tail pages) for a quantized cache', dtype);
  const bits = quantBits(format as QuantFormat);
  if ((headDim * bits) % 8 !== 0) throw invalid('E_SHAPE', 'headDim', `a multiple of ${8 / bits} for ${format} (whole bytes of codes per row)`, headDim);
  // fp8e4m3 has one scale per page and KV head: a group size means nothing to it (ops.createQuantizedPages ignores it too).
  if (format === 'fp8e4m3') return Object.freeze({ format: format as QuantFormat, groupSize: 32 });
  const group = groupSize ?? 32;
  if (group !== 32 && group !== 64 && group !== 128) throw invalid('E_RANGE', 'quant.groupSize', '32, 64 or 128', groupSize);
  if (headDim % group !== 0) throw invalid('E_SHAPE', 'headDim', `a multiple of quant.groupSize ${group}`, headDim);
  return Object.freeze({ format: format as QuantFormat, groupSize: group });
}
