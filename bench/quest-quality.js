#!/usr/bin/env node
// Quest's quality on synthetic long contexts with planted needles: for each context length and
// budget, the share of needle pages Quest selects (recall) and the share of the true attention mass
// its pages keep, beside a recent-window baseline (the last `budget` tokens). Runs on the CPU
// reference (the selection rule is the same on every backend: test/cuda/quest.test.ts).
// Writes bench/results/quest-quality-<date>.json and prints a table.
'use strict';
const fs = require('node:fs');
const path = require('node:path');
const { ops, Tensor } = require('../dist/cjs/index.js');
const { normalRandom, uniformRandom } = require('./random.js');

const [HEADS, KV_HEADS, DIM, PAGE] = [8, 2, 128, 16];
const GROUP = HEADS / KV_HEADS;
const NEEDLES_PER_HEAD = 4;
const LENGTHS = [32768, 131072];
const BUDGETS = [256, 512, 1024, 2048, 4096];

const uniform = uniformRandom(7);
const gauss = normalRandom(8);

function context(length) {
  const keys = new Float32Array(length * KV_HEADS * DIM).map(gauss);
  const q = new Float32Array(HEADS * DIM).map(gauss);
  // Each query head gets needles: keys along its own direction (strength c from 0.5 to 2.5, so
  // some stand far above the background and some barely), far from the recent window.
  const needles = []; // [token, kvHead, head, strength]
  for (let h = 0; h < HEADS; h++) {
    const kvHead = Math.floor(h / GROUP);
    for (let n = 0; n < NEEDLES_PER_HEAD; n++) {
      const token = Math.floor(uniform() * (length - 8192));
      const strength = 0.5 + (2 * n) / (NEEDLES_PER_HEAD - 1);
      for (let d = 0; d < DIM; d++) keys[(token * KV_HEADS + kvHead) * DIM + d] = strength * q[h * DIM + d] + 0.3 * gauss();
      needles.push([token, kvHead, h, strength]);
    }
  }
  return { keys, q, needles };
}

/** softmax(q·k / sqrt(D)) per query head over all tokens, as float64 weights [HEADS][length]. */
function attentionWeights(keys, q, length) {
  const weights = [];
  for (let h = 0; h < HEADS; h++) {
    const kvHead = Math.floor(h / GROUP);
    const logits = new Float64Array(length);
    let max = -Infinity;
    for (let t = 0; t < length; t++) {
      let dot = 0;
      const at = (t * KV_HEADS + kvHead) * DIM;
      for (let d = 0; d < DIM; d++) dot += q[h * DIM + d] * keys[at + d];
      logits[t] = dot / Math.sqrt(DIM);
      max = Math.max(max, logits[t]);
    }
    let sum = 0;
    for (let t = 0; t < length; t++) sum += logits[t] = Math.exp(logits[t] - max);
    for (let t = 0; t < length; t++) logits[t] /= sum;
    weights.push(logits);
  }
  return weights;
}

function evaluate(selectedPagesPerKvHead, weights, needles) {
  let mass = 0;
  for (let h = 0; h < HEADS; h++) {
    const pages = selectedPagesPerKvHead[Math.floor(h / GROUP)];
    for (const page of pages) for (let s = 0; s < PAGE; s++) mass += weights[h][page * PAGE + s] ?? 0;
  }
  const hit = ([token, kvHead]) => selectedPagesPerKvHead[kvHead].has(Math.floor(token / PAGE));
  const recallByStrength = {};
  for (const strength of new Set(needles.map((n) => n[3]))) {
    const tier = needles.filter((n) => n[3] === strength);
    recallByStrength[strength.toFixed(2)] = tier.filter(hit).length / tier.length;
  }
  return { recall: needles.filter(hit).length / needles.length, recallByStrength, massKept: mass / HEADS };
}

async function main() {
  const rows = [];
  for (const length of LENGTHS) {
    const { keys, q, needles } = context(length);
    const pages = length / PAGE;
    // One sequence whose pages are the pool in order: page p holds tokens p*16 .. p*16+15.
    const table = new ops.StagedPageTable({ indptr: [0, pages], indices: Int32Array.from({ length: pages }, (_, i) => i), lastPageLen: [PAGE] }, 'cpu');
    const kPages = Tensor.fromArray(keys, [pages, PAGE, KV_HEADS, DIM], { dtype: 'bf16' });
    const meta = ops.createQuestMeta(kPages);
    ops.buildQuestMeta(kPages, meta, table);
    const qt = Tensor.fromArray(q, [1, HEADS, DIM], { dtype: 'bf16' });
    const scores = ops.questScores(qt, kPages, meta, table);
    const weights = attentionWeights(keys, q, length);
    for (const budget of BUDGETS) {
      const selected = ops.topkPages(scores, table, budget / PAGE);
      const { indptr, indices } = await selected.toArrays();
      const quest = [0, 1].map((h) => new Set(indices.slice(indptr[h], indptr[h + 1])));
      const recentPages = new Set(Array.from({ length: budget / PAGE }, (_, i) => pages - 1 - i));
      rows.push({ length, budgetTokens: budget, quest: evaluate(quest, weights, needles), recentWindow: evaluate([recentPages, recentPages], weights, needles) });
      selected.dispose();
    }
    [table, kPages, meta, qt, scores].forEach((x) => x.dispose());
    process.stderr.write(`context ${length} done\n`);
  }
  const date = new Date().toISOString().slice(0, 10);
  const report = {
    date,
    setup: `B=1, H=${HEADS}, Hkv=${KV_HEADS}, D=${DIM}, page ${PAGE}, bf16 keys; Gaussian keys and query; ${NEEDLES_PER_HEAD} needles per query head (keys c*q + 0.3*noise, c = 0.5, 1.17, 1.83, 2.5) placed uniformly outside the last 8192 tokens; mass = share of the exact softmax weight (float64) on selected pages, averaged over query heads; seed 7`,
    rows,
  };
  const out = path.join(__dirname, 'results', `quest-quality-${date}.json`);
  fs.writeFileSync(out, JSON.stringify(report, null, 2) + '\n');
  const tiers = Object.keys(rows[0].quest.recallByStrength);
  console.log(`| context | budget (tokens) | Quest recall | by strength ${tiers.join(' / ')} | Quest mass kept | recent recall | recent mass kept |`);
  console.log('| --- | --- | --- | --- | --- | --- | --- |');
  for (const r of rows) {
    const byTier = tiers.map((t) => r.quest.recallByStrength[t].toFixed(2)).join(' / ');
    console.log(`| ${r.length} | ${r.budgetTokens} | ${r.quest.recall.toFixed(3)} | ${byTier} | ${r.quest.massKept.toFixed(3)} | ${r.recentWindow.recall.toFixed(3)} | ${r.recentWindow.massKept.toFixed(3)} |`);
  }
  console.log(`wrote ${path.relative(process.cwd(), out)}`);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
