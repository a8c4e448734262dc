// kvflash's attention kernels at the shapes of bench/shapes.json. Prints one JSON object:
// { device, results: [{ suite, name, ms, tflops | tbps, ... }] }.
'use strict';
const fs = require('node:fs');
const path = require('node:path');
const { backend, ops, Tensor } = require('../dist/cjs/index.js');
const { randomTensor, timeGpu } = require('./timing.js');
const { scatteredTable } = require('./paged-layout.js');

const shapes = JSON.parse(fs.readFileSync(path.join(__dirname, 'shapes.json'), 'utf8'));
const { heads, kvHeads, headDim, pageSize } = shapes;
const device = 'cuda:0';

function offsets(lengths) {
  const out = new Int32Array(lengths.length + 1);
  lengths.forEach((l, i) => (out[i + 1] = out[i] + l));
  return out;
}

async function prefill(shape) {
  const lengths = shape.lengths;
  const total = lengths.reduce((a, b) => a + b, 0);
  const q = randomTensor([total, heads, headDim], { seed: 1 });
  const k = randomTensor([total, kvHeads, headDim], { seed: 2 });
  const v = randomTensor([total, kvHeads, headDim], { seed: 3 });
  const cu = offsets(lengths);
  const time = await timeGpu(() => ops.prefillAttention(q, k, v, { cuSeqlensQ: cu, cuSeqlensK: cu }).out, { device });
  [q, k, v].forEach((t) => t.dispose());
  const flops = lengths.reduce((acc, s) => acc + 4 * ((s * s) / 2) * heads * headDim, 0);
  return { suite: 'prefill', name: shape.name, ms: time.medianMs, tflops: flops / (time.medianMs * 1e-3) / 1e12 };
}

async function decode(shape) {
  const { batch, length } = shape;
  const { numPages, table } = scatteredTable(batch, length, pageSize, 7);
  const kPages = randomTensor([numPages, pageSize, kvHeads, headDim], { seed: 4 });
  const vPages = randomTensor([numPages, pageSize, kvHeads, headDim], { seed: 5 });
  const q = randomTensor([batch, heads, headDim], { seed: 6 });
  const staged = new ops.StagedPageTable(table, device); // staged once per step, as the cache layer does
  const time = await timeGpu(() => ops.pagedDecodeAttention(q, { kPages, vPages }, staged).out, { device, flush: true });
  staged.dispose();
  [q, kPages, vPages].forEach((t) => t.dispose());
  const bytes = batch * length * kvHeads * headDim * 2 * 2; // K and V, bf16
  return { suite: 'decode', name: shape.name, ms: time.medianMs, us: time.medianMs * 1e3, tbps: bytes / (time.medianMs * 1e-3) / 1e12 };
}

async function main() {
  const info = backend();
  if (info.name !== 'cuda') throw new Error(`the GPU benchmark needs the CUDA backend: ${info.reason}`);
  const results = [];
  for (const shape of shapes.prefill) results.push(await prefill(shape));
  for (const shape of shapes.decode) results.push(await decode(shape));
  process.stdout.write(JSON.stringify({ device: info.device, computeCapability: info.computeCapability, results }) + '\n');
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
