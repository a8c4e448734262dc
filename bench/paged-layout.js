// Page tables for the benchmarks: a pool of exactly the pages a batch needs, handed out in a fixed
// shuffled order, so the kernels read scattered pages as a real cache's would (BENCH.md).
'use strict';

/** A permutation of 0..n-1 from a small LCG, the same for the same seed on every machine. */
function shuffledPages(n, seed) {
  const order = Int32Array.from({ length: n }, (_, i) => i);
  let s = seed;
  for (let i = n - 1; i > 0; i--) {
    s = (Math.imul(s, 1103515245) + 12345) >>> 0;
    const j = s % (i + 1);
    [order[i], order[j]] = [order[j], order[i]];
  }
  return order;
}

/** CSR table of `batch` sequences of `length` tokens each over a shuffled pool. */
function scatteredTable(batch, length, pageSize, seed) {
  const perSeq = Math.ceil(length / pageSize);
  const numPages = batch * perSeq;
  return {
    numPages,
    table: {
      indptr: Int32Array.from({ length: batch + 1 }, (_, b) => b * perSeq),
      indices: shuffledPages(numPages, seed),
      lastPageLen: new Int32Array(batch).fill(length - (perSeq - 1) * pageSize),
    },
  };
}

module.exports = { shuffledPages, scatteredTable };
