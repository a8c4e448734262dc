/** Element types, and the JS arrays that hold them on the host. */

export type DType = 'f32' | 'f16' | 'bf16' | 'fp8e4m3' | 'i8' | 'u8' | 'i32' | 'i64';

export const DTYPES: readonly DType[] = ['f32', 'f16', 'bf16', 'fp8e4m3', 'i8', 'u8', 'i32', 'i64'];

/** What `toArray()` returns: Float32Array for every float dtype, the matching integer array otherwise. */
export type HostArray = Float32Array | Int8Array | Uint8Array | Int32Array | BigInt64Array;

const BYTES: Record<DType, number> = { f32: 4, f16: 2, bf16: 2, fp8e4m3: 1, i8: 1, u8: 1, i32: 4, i64: 8 };

export function dtypeBytes(dtype: DType): number {
  return BYTES[dtype];
}

export function isFloat(dtype: DType): boolean {
  return dtype === 'f32' || dtype === 'f16' || dtype === 'bf16' || dtype === 'fp8e4m3';
}

export function isDType(value: unknown): value is DType {
  return typeof value === 'string' && (DTYPES as readonly string[]).includes(value);
}

/** Views raw host bytes as the array type toArray() gives for `dtype` (floats already widened to f32). */
export function hostArrayOf(dtype: DType, buffer: ArrayBuffer): HostArray {
  switch (dtype) {
    case 'i8':
      return new Int8Array(buffer);
    case 'u8':
      return new Uint8Array(buffer);
    case 'i32':
      return new Int32Array(buffer);
    case 'i64':
      return new BigInt64Array(buffer);
    default:
      return new Float32Array(buffer);
  }
}
