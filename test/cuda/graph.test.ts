// GPU suite: ops captured as a CUDA graph and replayed give what the same ops give run directly,
// reading the buffers' contents at replay time; the graph owns the memory allocated in its capture.
import { describe, expect, it } from 'vitest';

import { CudaGraph, KvflashError, ops, Tensor } from '../../lib/index';
import { normal, pagedCache, rng } from '../attention-fixtures';
import { quantizedCache } from '../quant-fixtures';

const device = 'cuda:0' as const;

async function expectSame(a: Tensor, b: Tensor, what: string): Promise<void> {
  expect(Buffer.from(await a.bytes()).equals(Buffer.from(await b.bytes())), what).toBe(true);
}

describe('CudaGraph', () => {
  it('replays a split paged decode and a Quest decode on the inputs of each replay', async () => {
    const random = rng(1000);
    const [heads, kvHeads, dim, pageSize] = [32, 8, 128, 16];
    const lens = [20000]; // alone: split across blocks, merged by a second kernel
    const cache = pagedCache(lens, pageSize, kvHeads, dim, random);
    const shape = [cache.numPages, pageSize, kvHeads, dim];
    using kPages = Tensor.fromArray(cache.kPages, shape, { dtype: 'bf16', device });
    using vPages = Tensor.fromArray(cache.vPages, shape, { dtype: 'bf16', device });
    using q = Tensor.fromArray(normal(heads * dim, random), [1, heads, dim], { dtype: 'bf16', device });
    using table = new ops.StagedPageTable(cache, device);
    using meta = ops.createQuestMeta(kPages);
    ops.buildQuestMeta(kPages, meta, table);
    const pages = { kPages, vPages };
    const step = () => ({
      dense: ops.pagedDecodeAttention(q, pages, table, { returnLse: true }),
      quest: ops.questDecodeAttention(q, pages, meta, table, 64, { returnLse: true }),
    });
    // Once eagerly first: the fused Quest decode makes its row counters on first use, which a capture may not do.
    const warm = step();
    for (const r of [warm.dense, warm.quest]) [r.out, r.lse!].forEach((t) => t.dispose());
    const { graph, result } = CudaGraph.capture(device, step);
    using g = graph;
    for (let round = 0; round < 3; round++) {
      if (round > 0) {
        // New inputs in the same buffers: the next replay reads them.
        using q2 = Tensor.fromArray(normal(heads * dim, random), [1, heads, dim], { dtype: 'bf16', device });
        q.copyFrom(q2);
        using v2 = Tensor.fromArray(normal(cache.vPages.length, random), shape, { dtype: 'bf16', device });
        if (round === 2) vPages.copyFrom(v2);
      }
      g.replay();
      const direct = step();
      for (const k of ['dense', 'quest'] as const) {
        await expectSame(result[k].out, direct[k].out, `${k} out, round ${round}`);
        await expectSame(result[k].lse!, direct[k].lse!, `${k} lse, round ${round}`);
        direct[k].out.dispose();
        direct[k].lse!.dispose();
      }
    }
    for (const r of [result.dense, result.quest]) [r.out, r.lse!].forEach((t) => t.dispose());
  });

  it('replays a quantized decode', async () => {
    const random = rng(1001);
    const [heads, kvHeads, dim] = [16, 4, 128];
    const lens = [1, 300, 3000];
    const qc = quantizedCache(lens, 16, kvHeads, dim, random, { format: 'int4', dtype: 'bf16', device });
    using q = Tensor.fromArray(normal(lens.length * heads * dim, random), [lens.length, heads, dim], { dtype: 'bf16', device });
    using table = new ops.StagedPageTable(qc.table, device);
    const { graph, result } = CudaGraph.capture(device, () => ops.quantizedPagedDecodeAttention(q, qc.quant, qc, table, { returnLse: true }));
    graph.replay();
    const direct = ops.quantizedPagedDecodeAttention(q, qc.quant, qc, table, { returnLse: true });
    await expectSame(result.out, direct.out, 'out');
    await expectSame(result.lse!, direct.lse!, 'lse');
    graph.dispose();
    expect(graph.disposed).toBe(true);
    expect(() => graph.replay()).toThrow(expect.objectContaining({ code: 'E_DISPOSED' }));
    for (const t of [result.out, result.lse, direct.out, direct.lse]) t?.dispose();
    qc.dispose();
  });

  it('keeps the blocks of its capture: an output disposed while it lives is not handed to anyone else', async () => {
    const random = rng(1002);
    const [heads, kvHeads, dim, pageSize] = [8, 2, 64, 16];
    const cache = pagedCache([500, 70], pageSize, kvHeads, dim, random);
    const shape = [cache.numPages, pageSize, kvHeads, dim];
    using kPages = Tensor.fromArray(cache.kPages, shape, { dtype: 'f16', device });
    using vPages = Tensor.fromArray(cache.vPages, shape, { dtype: 'f16', device });
    using q = Tensor.fromArray(normal(2 * heads * dim, random), [2, heads, dim], { dtype: 'f16', device });
    using table = new ops.StagedPageTable(cache, device);
    const { graph, result } = CudaGraph.capture(device, () => ops.pagedDecodeAttention(q, { kPages, vPages }, table).out);
    using g = graph;
    result.dispose();
    // Same size as the disposed output: a plain cache would hand its block over, and the replay would overwrite it.
    using other = Tensor.full([2, heads, dim], 7, { dtype: 'f16', device });
    g.replay();
    expect([...((await other.toArray()) as Float32Array)].every((x) => x === 7)).toBe(true);
  });

  it('refuses work it cannot capture, and the device goes on working', async () => {
    const random = rng(1003);
    const cache = pagedCache([40], 16, 2, 64, random);
    // Staging a table copies host arrays: a replay would read host memory long since reused.
    const hostCopy = 'Expected device work only while a CUDA graph is captured on cuda:0 but received a copy between host and device memory';
    expect(() => CudaGraph.capture(device, () => new ops.StagedPageTable(cache, device))).toThrow(expect.objectContaining({ code: 'E_UNSUPPORTED', message: hostCopy }));
    expect(() => CudaGraph.capture(device, () => Tensor.fromArray([1, 2], [2], { device }))).toThrow(KvflashError);
    expect(() => CudaGraph.capture(device, () => Promise.resolve(1))).toThrow(expect.objectContaining({ code: 'E_UNSUPPORTED' }));
    using t = Tensor.full([4], 2, { device });
    expect([...((await t.toArray()) as Float32Array)]).toEqual([2, 2, 2, 2]);
  });
});
