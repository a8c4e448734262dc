// Quantized paged decode beside the bf16 paged decode of the same logical context, at the paged-decode
// shapes of bench/shapes.json (pages scattered, L2 flushed before each run). Each sequence's last page
// stays in full precision (the tail pool), as in a quantized PagedKVCache. Prints one JSON object:
// { device, results: [{ name, batch, length, bf16Us, bf16BytesPerToken, formats: { <format>: { us,
//   speedup, bytesPerToken, byteRatio, efficiency } } }] }, where bytesPerToken counts codes and
// statistics of K and V over all KV heads of one layer, byteRatio = bf16 bytes / format bytes (the
// speedup a kernel running at the bf16 decode's bandwidth would reach) and efficiency = speedup / byteRatio.
// `--group-size N` (32 by default; 64 and 128 allowed) sets the integer formats' value group size.
'use strict';
const fs = require('node:fs');
const path = require('node:path');
const { backend, dtypeBytes, ops } = require('../dist/cjs/index.js');
const { randomTensor, timeGpu } = require('./timing.js');
const { scatteredTable } = require('./paged-layout.js');

const shapes = JSON.parse(fs.readFileSync(path.join(__dirname, 'shapes.json'), 'utf8'));
const { heads, kvHeads, headDim, pageSize } = shapes;
const device = 'cuda:0';
const FORMATS = ['fp8e4m3', 'int8', 'int4', 'int2'];
const args = process.argv.slice(2);
const groupSize = args.includes('--group-size') ? Number(args[args.indexOf('--group-size') + 1]) : 32;

const bytesOf = (tensors) => tensors.reduce((sum, t) => sum + (t ? t.numel * dtypeBytes(t.dtype) : 0), 0);

async function decodeShape({ name, batch, length }) {
  const { numPages, table } = scatteredTable(batch, length, pageSize, 7);
  const kPages = randomTensor([numPages, pageSize, kvHeads, headDim], { seed: 4 });
  const vPages = randomTensor([numPages, pageSize, kvHeads, headDim], { seed: 5 });
  const q = randomTensor([batch, heads, headDim], { seed: 6 });
  const staged = new ops.StagedPageTable(table, device);
  const bf16 = await timeGpu(() => ops.pagedDecodeAttention(q, { kPages, vPages }, staged).out, { device, flush: true });
  const bf16BytesPerToken = 2 * kvHeads * headDim * dtypeBytes('bf16');
  // Tail pool: sequence b's last page is row b of a full-precision pool (here the pool's first rows).
  const quantIndices = Int32Array.from(table.indices);
  for (let b = 0; b < batch; b++) quantIndices[table.indptr[b + 1] - 1] = b;
  const quantTable = new ops.StagedPageTable({ ...table, indices: quantIndices }, device);
  const tail = { kTail: kPages.slice(0, batch), vTail: vPages.slice(0, batch) };
  const allPages = Int32Array.from({ length: numPages }, (_, i) => i);
  const formats = {};
  for (const format of FORMATS) {
    const quant = ops.createQuantizedPages(numPages, pageSize, kvHeads, headDim, { format, groupSize, device });
    ops.quantizePages({ kSrc: kPages, vSrc: vPages, srcPages: allPages, dstPages: allPages }, quant);
    const time = await timeGpu(() => ops.quantizedPagedDecodeAttention(q, quant, tail, quantTable).out, { device, flush: true });
    const bytesPerToken = bytesOf([quant.kCodes, quant.vCodes, quant.kScale, quant.kMin, quant.vScale, quant.vMin]) / (numPages * pageSize);
    const speedup = bf16.medianMs / time.medianMs;
    const byteRatio = bf16BytesPerToken / bytesPerToken;
    formats[format] = { us: time.medianMs * 1e3, speedup, bytesPerToken, byteRatio, efficiency: speedup / byteRatio };
    ops.disposeQuantizedPages(quant);
  }
  [q, kPages, vPages, tail.kTail, tail.vTail, staged, quantTable].forEach((x) => x.dispose());
  return { name, batch, length, bf16Us: bf16.medianMs * 1e3, bf16BytesPerToken, formats };
}

async function main() {
  const info = backend();
  if (info.name !== 'cuda') throw new Error(`the GPU benchmark needs the CUDA backend: ${info.reason}`);
  const results = [];
  for (const shape of shapes.decode) results.push(await decodeShape(shape));
  process.stdout.write(JSON.stringify({ device: info.device, groupSize, results }) + '\n');
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
