import { describe, expect, it } from 'vitest';

import { DTYPES, Tensor } from '../lib/index';

describe('Tensor round trips on the host', () => {
  it('keeps values of every dtype that can hold them', async () => {
    const values = [0, 1, -2, 3, 96, -7]; // each exact in every dtype, fp8 included
    for (const dtype of DTYPES) {
      const data = dtype === 'u8' ? values.map(Math.abs) : values;
      using t = Tensor.fromArray(data, [2, 3], { dtype });
      expect(t.dtype).toBe(dtype);
      expect(t.shape).toEqual([2, 3]);
      expect(t.device).toBe('cpu');
      const back = await t.toArray();
      const expected = dtype === 'i64' ? data.map(BigInt) : data;
      expect([...back]).toEqual(expected);
    }
  });

  it('returns the array type of each dtype', async () => {
    const kinds: Record<string, Function> = {
      f32: Float32Array, f16: Float32Array, bf16: Float32Array, fp8e4m3: Float32Array,
      i8: Int8Array, u8: Uint8Array, i32: Int32Array, i64: BigInt64Array,
    };
    for (const dtype of DTYPES) {
      using t = Tensor.zeros([3], { dtype });
      expect(await t.toArray()).toBeInstanceOf(kinds[dtype]);
    }
  });

  it('takes typed arrays of other kinds and casts them', async () => {
    using a = Tensor.fromArray(new Int32Array([5, -3, 300]), [3], { dtype: 'i8' });
    expect([...(await a.toArray())]).toEqual([5, -3, 127]); // saturates, like the native cast
    using b = Tensor.fromArray(new Float64Array([0.5, 1.5]), [2], { dtype: 'f16' });
    expect([...(await b.toArray())]).toEqual([0.5, 1.5]);
    using c = Tensor.fromArray(new BigInt64Array([2n ** 40n, -1n]), [2], { dtype: 'i64' });
    expect([...(await c.toArray())]).toEqual([2n ** 40n, -1n]);
  });

  it('defaults the shape to the data length and handles empty tensors', async () => {
    using t = Tensor.fromArray([1, 2, 3]);
    expect(t.shape).toEqual([3]);
    using e = Tensor.zeros([0, 4], { dtype: 'bf16' });
    expect((await e.toArray()).length).toBe(0);
  });

  it('fills, casts and copies', async () => {
    using t = Tensor.full([2, 2], 2.5, { dtype: 'bf16' });
    expect([...(await t.toArray())]).toEqual([2.5, 2.5, 2.5, 2.5]);
    using i = t.cast('i32');
    expect([...(await i.toArray())]).toEqual([2, 2, 2, 2]);
    using c = Tensor.zeros([2, 2], { dtype: 'bf16' }).copyFrom(t);
    expect([...(await c.toArray())]).toEqual([2.5, 2.5, 2.5, 2.5]);
    using m = t.to('cpu');
    m.fill(1);
    expect([...(await t.toArray())]).toEqual([2.5, 2.5, 2.5, 2.5]); // to() copies
  });

  it('slices along dim 0 as a view that shares memory', async () => {
    using t = Tensor.fromArray([0, 1, 2, 3, 4, 5, 6, 7], [4, 2]);
    using rows = t.slice(1, 3);
    expect(rows.shape).toEqual([2, 2]);
    expect([...(await rows.toArray())]).toEqual([2, 3, 4, 5]);
    rows.fill(-1);
    expect([...(await t.toArray())]).toEqual([0, 1, -1, -1, -1, -1, 6, 7]);
  });

  it('keeps shared memory alive while a view holds it', async () => {
    const t = Tensor.fromArray([1, 2, 3, 4], [4]);
    const view = t.slice(2);
    t.dispose();
    expect([...(await view.toArray())]).toEqual([3, 4]);
    view.dispose();
  });

  it('reshapes and reinterprets without copying', async () => {
    using t = Tensor.fromArray([1, 2, 3, 4, 5, 6], [2, 3]);
    using r = t.reshape([3, 2]);
    expect(r.shape).toEqual([3, 2]);
    r.fill(0);
    expect([...(await t.toArray())]).toEqual([0, 0, 0, 0, 0, 0]);
    using h = Tensor.fromArray([1, -2], [2], { dtype: 'f16' });
    using bits = h.reinterpret('u8', [4]);
    expect([...(await bits.toArray())]).toEqual([0x00, 0x3c, 0x00, 0xc0]);
  });

  it('takes a toArray snapshot at call time', async () => {
    using t = Tensor.fromArray([1, 2], [2]);
    const pending = t.toArray();
    t.fill(9);
    expect([...(await pending)]).toEqual([1, 2]);
  });

  it('disposes once, through dispose() or Symbol.dispose', () => {
    const t = Tensor.zeros([4]);
    {
      using u = t;
      expect(u.disposed).toBe(false);
    }
    expect(t.disposed).toBe(true);
    t.dispose(); // a second dispose is harmless
    expect(String(t)).toBe('Tensor(f32 [4] on cpu, disposed)');
  });
});
