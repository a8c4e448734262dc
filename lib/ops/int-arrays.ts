/** Index arrays (offsets, page tables, positions) travel to the native side as Int32Arrays. */
import { invalid } from '../errors';

export type IntArray = Int32Array | readonly number[];

export function toInt32Array(value: IntArray, name: string): Int32Array {
  if (value instanceof Int32Array) return value;
  if (!Array.isArray(value)) throw invalid('E_DTYPE', name, 'an Int32Array or an array of integers', value);
  const out = new Int32Array(value.length);
  for (let i = 0; i < value.length; i++) {
    const v = value[i];
    if (!Number.isInteger(v) || v < -2147483648 || v > 2147483647) throw invalid('E_RANGE', `${name}[${i}]`, 'a 32-bit integer', v);
    out[i] = v;
  }
  return out;
}
