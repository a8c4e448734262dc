// Float encodings, bit for bit: known values, every adjacent-pair midpoint (ties to even), and
// round trips of every code. The CUDA suite repeats the same checks on the GPU's cast kernel.
import { describe, expect, it } from 'vitest';

import { Tensor } from '../lib/index';
import { allFinite16BitCodes, decodeF16, f16Midpoints, bf16Midpoints, fp8Midpoints, allFp8Codes, decodeBf16, decodeFp8 } from './float-codes';

async function encode(values: number[], dtype: 'f16' | 'bf16' | 'fp8e4m3'): Promise<number[]> {
  using t = Tensor.fromArray(Float32Array.from(values), [values.length], { dtype });
  const bytes = await t.bytes();
  return dtype === 'fp8e4m3' ? [...bytes] : [...new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.length / 2)];
}

describe('f16 encoding', () => {
  it('encodes known values', async () => {
    const cases: [number, number][] = [
      [1, 0x3c00], [-2, 0xc000], [65504, 0x7bff], [65519.99, 0x7bff], [65520, 0x7c00], [1e9, 0x7c00],
      [Infinity, 0x7c00], [-Infinity, 0xfc00], [NaN, 0x7e00], [-0, 0x8000], [2 ** -24, 0x0001],
      [2 ** -25, 0x0000], [3 * 2 ** -25, 0x0002], [2 ** -14, 0x0400], [1 + 2 ** -10, 0x3c01],
      [1 + 2 ** -11, 0x3c00], [1 + 3 * 2 ** -11, 0x3c02], [0.1, 0x2e66],
    ];
    expect(await encode(cases.map((c) => c[0]), 'f16')).toEqual(cases.map((c) => c[1]));
  });

  it('rounds every midpoint between adjacent values to the even code', async () => {
    const { values, expected } = f16Midpoints();
    expect(await encode(values, 'f16')).toEqual(expected);
  });

  it('decodes every code and encodes it back unchanged', async () => {
    const codes = allFinite16BitCodes(0x7c00);
    using t = Tensor.fromBytes(new Uint8Array(Uint16Array.from(codes).buffer), [codes.length], { dtype: 'f16' });
    const decoded = await t.toArray();
    expect([...decoded]).toEqual(codes.map(decodeF16));
    expect(await encode([...decoded as Float32Array], 'f16')).toEqual(codes);
  });
});

describe('bf16 encoding', () => {
  it('encodes known values', async () => {
    const cases: [number, number][] = [
      [1, 0x3f80], [1 + 2 ** -8, 0x3f80], [1 + 3 * 2 ** -8, 0x3f82], [-1.5, 0xbfc0], [NaN, 0x7fc0],
      [Infinity, 0x7f80], [3.4028234663852886e38, 0x7f80], [1e-40, 0x0001], [-0, 0x8000], [3.140625, 0x4049],
    ];
    expect(await encode(cases.map((c) => c[0]), 'bf16')).toEqual(cases.map((c) => c[1]));
  });

  it('rounds every midpoint between adjacent values to the even code', async () => {
    const { values, expected } = bf16Midpoints();
    expect(await encode(values, 'bf16')).toEqual(expected);
  });

  it('decodes every finite code and encodes it back unchanged', async () => {
    const codes = allFinite16BitCodes(0x7f80);
    using t = Tensor.fromBytes(new Uint8Array(Uint16Array.from(codes).buffer), [codes.length], { dtype: 'bf16' });
    const decoded = await t.toArray();
    expect([...decoded]).toEqual(codes.map(decodeBf16));
    expect(await encode([...decoded as Float32Array], 'bf16')).toEqual(codes);
  });
});

describe('fp8e4m3 encoding', () => {
  it('encodes known values and saturates at 448', async () => {
    const cases: [number, number][] = [
      [1, 0x38], [448, 0x7e], [449, 0x7e], [500, 0x7e], [1e6, 0x7e], [Infinity, 0x7e], [-Infinity, 0xfe],
      [-448, 0xfe], [NaN, 0x7f], [2 ** -9, 0x01], [2 ** -10, 0x00], [3 * 2 ** -10, 0x02], [2 ** -6, 0x08],
      [0.1, 0x1d], [-0, 0x80], [240, 0x77],
    ];
    expect(await encode(cases.map((c) => c[0]), 'fp8e4m3')).toEqual(cases.map((c) => c[1]));
  });

  it('rounds every midpoint between adjacent values to the even code', async () => {
    const { values, expected } = fp8Midpoints();
    expect(await encode(values, 'fp8e4m3')).toEqual(expected);
  });

  it('decodes every code and encodes it back unchanged', async () => {
    const codes = allFp8Codes();
    using t = Tensor.fromBytes(Uint8Array.from(codes), [codes.length], { dtype: 'fp8e4m3' });
    const decoded = await t.toArray();
    expect([...decoded]).toEqual(codes.map(decodeFp8));
    expect(await encode([...decoded as Float32Array], 'fp8e4m3')).toEqual(codes);
  });
});
