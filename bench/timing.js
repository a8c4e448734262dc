// Timing GPU work the way bench/baselines/attention.py does: CUDA events around the op, a busy
// kernel queued first so that host-side preparation never shows as device time, the L2 cache
// flushed by reads (no dirty lines to write back during the op) before each run when asked (decode),
// warm-up, then the median of the runs.
'use strict';
const { Tensor, TimingEvent, flushL2Cache, gpuBusyWait, synchronize } = require('../dist/cjs/index.js');
const { normalRandom } = require('./random.js');

/** Times `run()` (which returns tensors to dispose, or nothing). Returns { medianMs, minMs, runs }. */
async function timeGpu(run, { device = 'cuda:0', flush = false, warmup = 5, iterations = 30 } = {}) {
  const release = (out) => [].concat(out ?? []).forEach((t) => t.dispose());
  for (let i = 0; i < warmup; i++) release(run());
  await synchronize(device);
  const times = [];
  for (let i = 0; i < iterations; i++) {
    if (flush) flushL2Cache(device);
    gpuBusyWait(0.1, device);
    const start = new TimingEvent(device);
    const out = run();
    const end = new TimingEvent(device);
    times.push(await end.elapsedSince(start));
    release(out);
  }
  times.sort((a, b) => a - b);
  return { medianMs: times[times.length >> 1], minMs: times[0], runs: iterations };
}

/** A tensor of unit-normal values, made by repeating one random block (fast for GB-sized pools). */
function randomTensor(shape, { dtype = 'bf16', device = 'cuda:0', seed = 1 } = {}) {
  const total = shape.reduce((a, b) => a * b, 1);
  const blockLength = Math.min(total, 1 << 22);
  const normal = normalRandom(seed);
  const data = new Float32Array(blockLength);
  for (let i = 0; i < blockLength; i++) data[i] = normal();
  const block = Tensor.fromArray(data, [blockLength], { dtype, device });
  const out = Tensor.empty(shape, { dtype, device });
  const flat = out.reshape([total]);
  for (let at = 0; at < total; at += blockLength) {
    const n = Math.min(blockLength, total - at);
    const part = block.slice(0, n);
    const dst = flat.slice(at, at + n);
    dst.copyFrom(part);
    part.dispose();
    dst.dispose();
  }
  flat.dispose();
  block.dispose();
  return out;
}

module.exports = { timeGpu, randomTensor };
