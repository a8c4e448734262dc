// Independent definitions of the 16- and 8-bit float formats, written from their specifications
// with plain arithmetic (no bit tricks), to check the native encoders against.

export function decodeF16(code: number): number {
  const sign = code & 0x8000 ? -1 : 1;
  const exp = (code >> 10) & 0x1f;
  const man = code & 0x3ff;
  if (exp === 0) return sign * man * 2 ** -24;
  if (exp === 31) return man ? NaN : sign * Infinity;
  return sign * (1 + man / 1024) * 2 ** (exp - 15);
}

export function decodeBf16(code: number): number {
  const sign = code & 0x8000 ? -1 : 1;
  const exp = (code >> 7) & 0xff;
  const man = code & 0x7f;
  if (exp === 0) return sign * man * 2 ** -133;
  if (exp === 255) return man ? NaN : sign * Infinity;
  return sign * (1 + man / 128) * 2 ** (exp - 127);
}

export function decodeFp8(code: number): number {
  const sign = code & 0x80 ? -1 : 1;
  const exp = (code >> 3) & 0xf;
  const man = code & 0x7;
  if (exp === 15 && man === 7) return NaN;
  if (exp === 0) return sign * man * 2 ** -9;
  return sign * (1 + man / 8) * 2 ** (exp - 7);
}

/** Every non-negative and negative code below `infCode` (the finite ones). */
export function allFinite16BitCodes(infCode: number): number[] {
  const codes: number[] = [];
  for (let c = 0; c < infCode; c++) codes.push(c, c | 0x8000);
  return codes;
}

export function allFp8Codes(): number[] {
  const codes: number[] = [];
  for (let c = 0; c < 0x7f; c++) codes.push(c, c | 0x80);
  return codes;
}

/** Midpoints between each pair of adjacent positive codes below `lastCode`, and the even code each must round to. */
function midpoints(lastCode: number, decode: (c: number) => number): { values: number[]; expected: number[] } {
  const values: number[] = [];
  const expected: number[] = [];
  for (let c = 0; c < lastCode; c++) {
    values.push((decode(c) + decode(c + 1)) / 2);
    expected.push(c % 2 === 0 ? c : c + 1);
  }
  return { values, expected };
}

export const f16Midpoints = () => midpoints(0x7bff, decodeF16);
export const bf16Midpoints = () => midpoints(0x7f7f, decodeBf16);
export const fp8Midpoints = () => midpoints(0x7e, decodeFp8);
