// Bad input never crashes: it throws a KvflashError with a code, a message naming the argument,
// what was expected and what came, and a stack that starts at the caller's line.
import { describe, expect, it } from 'vitest';

import { KvflashError, Tensor } from '../lib/index';

function thrown(fn: () => unknown): KvflashError {
  try {
    fn();
  } catch (error) {
    expect(error).toBeInstanceOf(KvflashError);
    return error as KvflashError;
  }
  throw new Error('expected a throw');
}

describe('KvflashError', () => {
  it('names a bad dtype', () => {
    const e = thrown(() => Tensor.zeros([2], { dtype: 'f33' as never }));
    expect(e.code).toBe('E_DTYPE');
    expect(e.message).toBe("Expected one of f32, f16, bf16, fp8e4m3, i8, u8, i32, i64 for dtype but received 'f33' of type string");
  });

  it('names negative and non-integer sizes', () => {
    const neg = thrown(() => Tensor.zeros([2, -1]));
    expect(neg.code).toBe('E_SHAPE');
    expect(neg.message).toBe('Expected non-negative integer for shape[1] but received -1 of type number');
    const frac = thrown(() => Tensor.empty([1.5]));
    expect(frac.code).toBe('E_SHAPE');
    expect(frac.message).toBe('Expected non-negative integer for shape[0] but received 1.5 of type number');
    expect(thrown(() => Tensor.zeros('3' as never)).message).toBe("Expected array of non-negative integers for shape but received '3' of type string");
  });

  it('names a data length that does not match the shape', () => {
    const e = thrown(() => Tensor.fromArray([1, 2, 3, 4, 5], [2, 3]));
    expect(e.code).toBe('E_SHAPE');
    expect(e.message).toBe('Expected data of 6 elements for shape [2, 3] but received 5');
  });

  it('names integers out of range for their dtype', () => {
    const e = thrown(() => Tensor.fromArray([1, 300], [2], { dtype: 'u8' }));
    expect(e.code).toBe('E_RANGE');
    expect(e.message).toBe('Expected integer in [0, 255] for dtype u8 for data[1] but received 300 of type number');
    expect(thrown(() => Tensor.fromArray([0.5], [1], { dtype: 'i32' })).code).toBe('E_RANGE');
  });

  it('refuses a disposed tensor', async () => {
    const t = Tensor.zeros([2]);
    t.dispose();
    for (const use of [() => t.fill(1), () => t.cast('f16'), () => t.slice(0, 1), () => t.to('cpu')]) {
      const e = thrown(use);
      expect(e.code).toBe('E_DISPOSED');
      expect(e.message).toBe('Expected a live Tensor but received a disposed f32 [2] tensor');
    }
    await expect(t.toArray()).rejects.toMatchObject({ code: 'E_DISPOSED' });
    using live = Tensor.zeros([2]);
    expect(thrown(() => live.copyFrom(t)).code).toBe('E_DISPOSED');
  });

  it('names bad devices, views and reinterpretations', () => {
    expect(thrown(() => Tensor.zeros([2], { device: 'gpu' as never })).message).toBe(
      "Expected 'cpu', 'cuda' or 'cuda:N' for device but received 'gpu'",
    );
    using t = Tensor.zeros([4, 2]);
    const s = thrown(() => t.slice(3, 9));
    expect(s.code).toBe('E_RANGE');
    expect(s.message).toBe('Expected 0 <= start <= end <= 4 for slice but received start 3, end 9');
    expect(thrown(() => t.reshape([3, 3])).code).toBe('E_SHAPE');
    expect(thrown(() => t.reinterpret('f16', [3])).message).toBe('Expected 32 bytes for reinterpret of f32 [4, 2] on cpu but received f16 [3] (6 bytes)');
    using other = Tensor.zeros([3]);
    expect(thrown(() => t.copyFrom(other)).code).toBe('E_SHAPE');
  });

  it('points its stack at the caller', () => {
    const e = thrown(() => Tensor.zeros([-1]));
    const firstFrame = e.stack!.split('\n')[1]!;
    expect(firstFrame).toContain('errors.test.ts');
    expect(e.stack!.startsWith('KvflashError: Expected non-negative integer')).toBe(true);
  });

  it('points an async rejection at the caller too', async () => {
    const t = Tensor.zeros([1]);
    t.dispose();
    const e = (await t.toArray().catch((error: unknown) => error)) as KvflashError;
    expect(e.code).toBe('E_DISPOSED');
    expect(e.stack).toContain('errors.test.ts');
  });
});
