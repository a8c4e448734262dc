// GPU suite: runs only where the CUDA backend is live (see vitest.config.mts).
import { describe, expect, it } from 'vitest';

import { backend, DTYPES, gpuBusyWait, Tensor } from '../../lib/index';
import { allFinite16BitCodes, allFp8Codes, bf16Midpoints, f16Midpoints, fp8Midpoints } from '../float-codes';

const device = 'cuda:0' as const;

describe('CUDA tensors', () => {
  it('runs on the CUDA backend', () => {
    expect(backend().name).toBe('cuda');
    expect(backend().computeCapability).toMatch(/^\d+\.\d+$/);
  });

  it('round-trips every dtype through the device', async () => {
    const values = [0, 1, -2, 3, 96, -7];
    for (const dtype of DTYPES) {
      const data = dtype === 'u8' ? values.map(Math.abs) : values;
      using t = Tensor.fromArray(data, [3, 2], { dtype, device });
      expect(t.device).toBe('cuda:0');
      const expected = dtype === 'i64' ? data.map(BigInt) : data;
      expect([...(await t.toArray())]).toEqual(expected);
      using back = t.to('cpu');
      expect([...(await back.toArray())]).toEqual(expected);
    }
  });

  it('casts on the GPU bit for bit as the CPU reference does', async () => {
    const inputs = [
      ...f16Midpoints().values, ...bf16Midpoints().values, ...fp8Midpoints().values,
      NaN, Infinity, -Infinity, 1e-45, -0, 448, 449, 65520, 3.4e38, ...Array.from({ length: 4096 }, () => (Math.random() - 0.5) * 2 ** (Math.random() * 40 - 20)),
    ];
    using cpu = Tensor.fromArray(Float32Array.from(inputs));
    using gpu = cpu.to(device);
    for (const dtype of ['f16', 'bf16', 'fp8e4m3', 'i8', 'u8', 'i32', 'i64'] as const) {
      using c = cpu.cast(dtype);
      using g = gpu.cast(dtype);
      expect(Buffer.from(await g.bytes()).equals(Buffer.from(await c.bytes())), dtype).toBe(true);
    }
    // Decoding: every 16-bit and 8-bit code widened to f32 on the GPU equals the host's decoding.
    const codes16 = new Uint8Array(Uint16Array.from(allFinite16BitCodes(0x7c00)).buffer);
    for (const dtype of ['f16', 'bf16'] as const) {
      using h = Tensor.fromBytes(codes16, [codes16.length / 2], { dtype });
      using d = Tensor.fromBytes(codes16, [codes16.length / 2], { dtype, device });
      using wide = d.cast('f32');
      expect([...(await wide.toArray())]).toEqual([...(await h.toArray())]);
    }
    using f8 = Tensor.fromBytes(Uint8Array.from(allFp8Codes()), [254], { dtype: 'fp8e4m3', device });
    using f8wide = f8.cast('f32');
    using f8host = Tensor.fromBytes(Uint8Array.from(allFp8Codes()), [254], { dtype: 'fp8e4m3' });
    expect([...(await f8wide.toArray())]).toEqual([...(await f8host.toArray())]);
  });

  it('fills, slices and copies on the device', async () => {
    using t = Tensor.zeros([5, 3], { dtype: 'bf16', device });
    using rows = t.slice(1, 3);
    rows.fill(1.5);
    expect([...(await t.toArray())]).toEqual([0, 0, 0, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5, 0, 0, 0, 0, 0, 0]);
    using host = Tensor.fromArray([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [5, 3], { dtype: 'bf16' });
    t.copyFrom(host);
    expect([...(await t.toArray())]).toEqual([...(await host.toArray())]);
    using i = Tensor.full([1000], -3, { dtype: 'i64', device });
    expect((await i.toArray()).every((v) => v === -3n)).toBe(true);
  });

  it('lets host ops read a download only once it has landed', async () => {
    using g = Tensor.fromArray(Float32Array.from({ length: 1 << 20 }, (_, i) => i % 1000), [1 << 20], { device });
    gpuBusyWait(200, device); // the download below queues behind this
    using host = g.to('cpu');
    using copy = host.cast('f32'); // a host op straight away: must see the finished data
    const values = await copy.toArray();
    expect(values[999]).toBe(999);
    expect(values[(1 << 20) - 1]).toBe(((1 << 20) - 1) % 1000);
    // toArray of a landing download waits off the event loop.
    gpuBusyWait(300, device);
    using later = g.to('cpu');
    let ticks = 0;
    const timer = setInterval(() => ticks++, 10);
    const read = await later.toArray();
    clearInterval(timer);
    expect(read[12345]).toBe(345);
    expect(ticks).toBeGreaterThan(10);
  });

  it('moves large tensors both ways intact', async () => {
    const n = 3_000_001;
    const data = new Float32Array(n);
    for (let k = 0; k < n; k++) data[k] = Math.sin(k);
    using g = Tensor.fromArray(data, [n], { device });
    const back = await g.toArray();
    expect(Buffer.from(back.buffer).equals(Buffer.from(data.buffer))).toBe(true);
  });
});
