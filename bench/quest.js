// Quest's speed at B=1 (bench/shapes.json's head layout): the whole step (questDecodeAttention:
// scoring, top-k and the sparse decode in one kernel) against the full paged decode over the same
// cache, both timed with the L2 flushed; beside it the same step as three ops and each op alone.
// Prints one JSON object: { device, results: [{ length, budgetTokens, fullUs, questUs, speedup,
// threeOpsUs, stagesUs }] }.
'use strict';
const fs = require('node:fs');
const path = require('node:path');
const { backend, ops } = require('../dist/cjs/index.js');
const { randomTensor, timeGpu } = require('./timing.js');
const { scatteredTable } = require('./paged-layout.js');

const shapes = JSON.parse(fs.readFileSync(path.join(__dirname, 'shapes.json'), 'utf8'));
const { heads, kvHeads, headDim, pageSize } = shapes;
const device = 'cuda:0';
const LENGTHS = [32768, 131072];
const BUDGETS = [1024, 2048, 4096];

async function main() {
  const info = backend();
  if (info.name !== 'cuda') throw new Error(`the GPU benchmark needs the CUDA backend: ${info.reason}`);
  const results = [];
  for (const length of LENGTHS) {
    const { numPages: pages, table: layout } = scatteredTable(1, length, pageSize, 11);
    const table = new ops.StagedPageTable(layout, device);
    const kPages = randomTensor([pages, pageSize, kvHeads, headDim], { seed: 21 });
    const vPages = randomTensor([pages, pageSize, kvHeads, headDim], { seed: 22 });
    const q = randomTensor([1, heads, headDim], { seed: 23 });
    const meta = ops.createQuestMeta(kPages);
    ops.buildQuestMeta(kPages, meta, table);
    const pool = { kPages, vPages };
    const full = await timeGpu(() => ops.pagedDecodeAttention(q, pool, table).out, { device, flush: true });
    for (const budget of BUDGETS) {
      const quest = await timeGpu(() => {
        const { out } = ops.questDecodeAttention(q, pool, meta, table, budget / pageSize);
        return out;
      }, { device, flush: true });
      const threeOps = await timeGpu(() => {
        const scores = ops.questScores(q, kPages, meta, table);
        const selected = ops.topkPages(scores, table, budget / pageSize);
        const out = ops.pagedDecodeAttention(q, pool, selected).out;
        selected.dispose();
        return [scores, out];
      }, { device, flush: true });
      // Each stage alone, for where the time goes (cold cache each).
      const scoresOnly = await timeGpu(() => ops.questScores(q, kPages, meta, table), { device, flush: true });
      const scores = ops.questScores(q, kPages, meta, table);
      const topkOnly = await timeGpu(() => {
        const selected = ops.topkPages(scores, table, budget / pageSize);
        selected.dispose();
      }, { device, flush: true });
      const selected = ops.topkPages(scores, table, budget / pageSize);
      const sparseOnly = await timeGpu(() => ops.pagedDecodeAttention(q, pool, selected).out, { device, flush: true });
      selected.dispose();
      scores.dispose();
      results.push({
        length,
        budgetTokens: budget,
        fullUs: full.medianMs * 1e3,
        questUs: quest.medianMs * 1e3,
        speedup: full.medianMs / quest.medianMs,
        threeOpsUs: threeOps.medianMs * 1e3,
        stagesUs: { scores: scoresOnly.medianMs * 1e3, topk: topkOnly.medianMs * 1e3, sparseDecode: sparseOnly.medianMs * 1e3 },
      });
    }
    [table, kPages, vPages, q, meta].forEach((x) => x.dispose());
  }
  process.stdout.write(JSON.stringify({ device: info.device, results }) + '\n');
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
