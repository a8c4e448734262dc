// GPU suite: allocator, out-of-memory handling, and waits that leave the event loop free.
import { describe, expect, it } from 'vitest';

import { emptyCache, flushL2Cache, gpuBusyWait, KvflashError, memory, synchronize, Tensor, TimingEvent } from '../../lib/index';

const device = 'cuda:0' as const;

describe('CUDA runtime', () => {
  it('reuses freed device memory without a new cudaMalloc', () => {
    const a = Tensor.empty([8 << 20], { dtype: 'bf16', device }); // 16 MiB
    const held = memory(device);
    a.dispose();
    const freed = memory(device);
    expect(freed.cached).toBeGreaterThanOrEqual(16 << 20);
    using b = Tensor.empty([8 << 20], { dtype: 'bf16', device });
    expect(b.numel).toBe(8 << 20);
    const again = memory(device);
    expect(again.cacheHits).toBe(freed.cacheHits + 1);
    expect(again.inUse + again.cached).toBe(held.inUse + held.cached);
  });

  it('turns an impossible allocation into E_OOM with its size, and keeps working', async () => {
    let error: unknown;
    try {
      Tensor.empty([2 ** 40], { dtype: 'f32', device }); // 4 TiB
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(KvflashError);
    expect((error as KvflashError).code).toBe('E_OOM');
    expect((error as KvflashError).message).toContain('could not allocate 4398046511104 bytes');
    using t = Tensor.fromArray([1, 2, 3], [3], { device });
    expect([...(await t.toArray())]).toEqual([1, 2, 3]);
  });

  it('gives cached blocks back on emptyCache', () => {
    Tensor.empty([1 << 20], { device }).dispose();
    expect(memory(device).cached).toBeGreaterThan(0);
    emptyCache(device);
    expect(memory(device).cached).toBe(0);
  });

  it('keeps the event loop running while a long GPU op finishes', async () => {
    using t = Tensor.fromArray([42], [1], { device });
    gpuBusyWait(600, device); // queued before the read, so the read waits ~600 ms
    let ticks = 0;
    const timer = setInterval(() => ticks++, 10);
    const started = performance.now();
    const value = await t.toArray();
    const elapsed = performance.now() - started;
    clearInterval(timer);
    expect(value[0]).toBe(42);
    expect(elapsed).toBeGreaterThan(450);
    expect(ticks).toBeGreaterThan(20); // a blocked loop would have ticked at most once
  });

  it('resolves synchronize() after queued work without blocking', async () => {
    gpuBusyWait(300, device);
    let ticks = 0;
    const timer = setInterval(() => ticks++, 10);
    await synchronize(device);
    clearInterval(timer);
    expect(ticks).toBeGreaterThan(10);
  });

  it('refuses a device index that does not exist', () => {
    let error: unknown;
    try {
      Tensor.zeros([1], { device: 'cuda:63' });
    } catch (e) {
      error = e;
    }
    expect((error as KvflashError).code).toBe('E_DEVICE');
    expect((error as KvflashError).message).toMatch(/^Expected a device index below \d+ but received cuda:63$/);
  });
});

describe('flushL2Cache (cuda)', () => {
  it('reads through a buffer larger than L2 without touching other memory', async () => {
    using t = Tensor.fromArray([1, 2, 3], [3], { device });
    const start = new TimingEvent(device);
    flushL2Cache(device);
    const end = new TimingEvent(device);
    expect(await end.elapsedSince(start)).toBeGreaterThan(0.01); // ~200 MB of reads takes tens of microseconds
    expect([...(await t.toArray())]).toEqual([1, 2, 3]);
  });
});

describe('TimingEvent (cuda)', () => {
  it('measures device time of queued work', async () => {
    const start = new TimingEvent(device);
    gpuBusyWait(50, device);
    const end = new TimingEvent(device);
    const ms = await end.elapsedSince(start);
    expect(ms).toBeGreaterThan(45);
    expect(ms).toBeLessThan(500);
  });
});
