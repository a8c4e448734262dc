// The caching allocator's policy, exercised on host memory (the CUDA suite repeats it on a GPU).
import { execFileSync } from 'node:child_process';
import * as path from 'node:path';

import { afterEach, describe, expect, it } from 'vitest';

import { CudaGraph, emptyCache, flushL2Cache, gpuBusyWait, KvflashError, memory, setMemoryLimit, Tensor, TimingEvent } from '../lib/index';

afterEach(() => setMemoryLimit('cpu', 0));

describe('caching allocator (cpu)', () => {
  it('reuses a freed block for the next request of its size', () => {
    const before = memory('cpu');
    const a = Tensor.empty([1 << 18]); // 1 MiB
    const afterAlloc = memory('cpu');
    expect(afterAlloc.inUse - before.inUse).toBeGreaterThanOrEqual(1 << 20);
    a.dispose();
    const afterFree = memory('cpu');
    expect(afterFree.inUse).toBe(before.inUse);
    expect(afterFree.cached).toBeGreaterThanOrEqual(1 << 20);
    const b = Tensor.empty([1 << 18]);
    const reused = memory('cpu');
    expect(reused.cacheHits).toBe(afterFree.cacheHits + 1);
    expect(reused.inUse + reused.cached).toBe(afterFree.inUse + afterFree.cached); // nothing new reserved
    b.dispose();
  });

  it('tracks the peak and gives the cache back on emptyCache', () => {
    const t = Tensor.empty([3 << 20]); // 12 MiB
    expect(memory('cpu').peak).toBeGreaterThanOrEqual(12 << 20);
    t.dispose();
    expect(memory('cpu').cached).toBeGreaterThanOrEqual(12 << 20);
    emptyCache('cpu');
    expect(memory('cpu').cached).toBe(0);
  });

  it('fails a request past the limit with E_OOM naming its size, and recovers', () => {
    emptyCache('cpu');
    setMemoryLimit('cpu', memory('cpu').inUse + (8 << 20));
    const kept = Tensor.empty([1 << 20]); // 4 MiB fits
    let error: unknown;
    try {
      Tensor.empty([2 << 20]); // 8 MiB more does not
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(KvflashError);
    expect((error as KvflashError).code).toBe('E_OOM');
    expect((error as KvflashError).message).toMatch(/^Out of memory on cpu: could not allocate 8388608 bytes \(\d+ bytes in use, limit \d+ bytes\)$/);
    kept.dispose();
    using after = Tensor.empty([2 << 20]); // the freed block plus headroom now fit
    expect(after.disposed).toBe(false);
  });

  it('frees a tensor dropped without dispose when the garbage collector runs (safety net)', () => {
    // A child process, because only it can be started with --expose-gc.
    const script = `
      const { Tensor, memory } = require('./dist/cjs/index.js');
      const before = memory('cpu').inUse;
      (() => { Tensor.empty([1 << 20]); })();
      const held = memory('cpu').inUse;
      (async () => {
        for (let i = 0; i < 20 && memory('cpu').inUse > before; i++) { gc(); await new Promise((r) => setTimeout(r, 5)); }
        console.log(JSON.stringify({ before, held, after: memory('cpu').inUse }));
      })();`;
    const out = JSON.parse(execFileSync(process.execPath, ['--expose-gc', '-e', script], { cwd: path.join(__dirname, '..'), encoding: 'utf8' }));
    expect(out.held - out.before).toBeGreaterThanOrEqual(4 << 20);
    expect(out.after).toBe(out.before);
  });
});

describe('GPU-only runtime helpers on the CPU backend', () => {
  it('refuse the cpu device with E_UNSUPPORTED', () => {
    expect(() => gpuBusyWait(1, 'cpu')).toThrow(expect.objectContaining({ code: 'E_UNSUPPORTED' }));
    expect(() => flushL2Cache('cpu')).toThrow(expect.objectContaining({ code: 'E_UNSUPPORTED', message: 'Expected a cuda device for flush_cache but received cpu' }));
    let ran = false;
    expect(() => CudaGraph.capture('cpu', () => (ran = true))).toThrow(expect.objectContaining({ code: 'E_UNSUPPORTED', message: 'Expected a cuda device for graph capture but received cpu' }));
    expect(ran).toBe(false);
  });
});

describe('TimingEvent (cpu)', () => {
  it('measures elapsed host time between two points', async () => {
    const start = new TimingEvent('cpu');
    const until = performance.now() + 20;
    while (performance.now() < until);
    const end = new TimingEvent('cpu');
    const ms = await end.elapsedSince(start);
    expect(ms).toBeGreaterThanOrEqual(19);
    expect(ms).toBeLessThan(1000);
  });
});
