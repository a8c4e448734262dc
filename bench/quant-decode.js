// Quantized paged decode against bf16 paged decode at large shapes (issue 4's speedup targets:
// int8 >= 1.8x, int4 >= 3.2x, int2 >= 5x). Same pages, same table, L2 flushed before each run.
// Usage (GPU machine): node bench/quant-decode.js [--out FILE.json]
'use strict';
const fs = require('node:fs');
const { backend, ops } = require('../dist/cjs/index.js');
const { timeGpu, randomTensor } = require('./timing');

const device = 'cuda:0';
const SHAPES = [
  { batch: 8, heads: 32, kvHeads: 8, dim: 128, seqLen: 8192, pageSize: 16 },
  { batch: 32, heads: 32, kvHeads: 8, dim: 128, seqLen: 4096, pageSize: 16 },
  { batch: 64, heads: 32, kvHeads: 8, dim: 128, seqLen: 8192, pageSize: 16 },
  { batch: 4, heads: 64, kvHeads: 8, dim: 128, seqLen: 32768, pageSize: 16 },
];
const FORMATS = ['fp8e4m3', 'int8', 'int4', 'int2'];

async function main() {
  const outIndex = process.argv.indexOf('--out');
  const results = [];
  console.log(`device: ${backend().device}`);
  for (const s of SHAPES) {
    const pagesPer = Math.ceil(s.seqLen / s.pageSize);
    const numPages = s.batch * pagesPer;
    const pool = [numPages, s.pageSize, s.kvHeads, s.dim];
    const kPages = randomTensor(pool, { seed: 1 }), vPages = randomTensor(pool, { seed: 2 });
    const q = randomTensor([s.batch, s.heads, s.dim], { seed: 3 });
    const indptr = Int32Array.from({ length: s.batch + 1 }, (_, b) => b * pagesPer);
    const indices = Int32Array.from({ length: numPages }, (_, i) => i);
    const lastPageLen = new Int32Array(s.batch).fill(s.seqLen - (pagesPer - 1) * s.pageSize);
    const table = new ops.StagedPageTable({ indptr, indices, lastPageLen }, device);
    const bf16 = await timeGpu(() => ops.pagedDecodeAttention(q, { kPages, vPages }, table).out, { flush: true });
    const row = { ...s, bf16Ms: bf16.medianMs };
    // The tail pool holds each sequence's last page (here: a copy of the first pages of the pool).
    const tailIndices = Int32Array.from(indices);
    for (let b = 0; b < s.batch; b++) tailIndices[indptr[b + 1] - 1] = b;
    const qTable = new ops.StagedPageTable({ indptr, indices: tailIndices, lastPageLen }, device);
    const kTail = kPages.slice(0, s.batch), vTail = vPages.slice(0, s.batch);
    for (const format of FORMATS) {
      const quant = ops.createQuantizedPages(numPages, s.pageSize, s.kvHeads, s.dim, { format, device });
      ops.quantizePages({ kSrc: kPages, vSrc: vPages, srcPages: indices, dstPages: indices }, quant);
      const t = await timeGpu(() => ops.quantizedPagedDecodeAttention(q, quant, { kTail, vTail }, qTable).out, { flush: true });
      row[`${format}Ms`] = t.medianMs;
      row[`${format}Speedup`] = bf16.medianMs / t.medianMs;
      ops.disposeQuantizedPages(quant);
    }
    console.log(JSON.stringify(row));
    results.push(row);
    for (const t of [kPages, vPages, q, kTail, vTail]) t.dispose();
    table.dispose();
    qTable.dispose();
  }
  if (outIndex > 0) fs.writeFileSync(process.argv[outIndex + 1], JSON.stringify({ device: backend().device, results }, null, 2));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
