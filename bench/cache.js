// Microbenchmarks of the cache managers (host-side bookkeeping, no kernels): allocator operations
// per second and the page-table build for 1024 sequences of 4096 tokens (target < 50 µs): for a batch
// the cache did not build last (every row copied) and for the same batch again (the cache's kept buffers
// are brought up to date, copying only what changed), with the `benchmark` package; then timed build by
// build at decode steps, where rows gained pages in between, and whole beginStep calls.
// Writes bench/results/cache-<date>-cpu.json; run `npm run build:ts` first.
'use strict';
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { performance } = require('node:perf_hooks');
const Benchmark = require('benchmark');
const { BlockAllocator, PagedKVCache, Tensor, ops } = require('../dist/cjs/index.js');

const BATCH = 1024;
const TOKENS = 4096;
/** Decode steps timed per pattern, and how many pages a row may gain before the rows are cut back. */
const DECODE_STEPS = 400;
const DECODE_HEADROOM = 4;

/**
 * A cache whose pools are as small as a page allows: the page table does not depend on head sizes.
 * With `written`, the keys of every token are written (f16: appends take floating point), so that
 * the next append grows the sequence; else the pages are only reserved.
 */
function fullCache(pageSize, { extraPages = 0, written = false } = {}) {
  const numPages = (BATCH * TOKENS) / pageSize + extraPages;
  const cache = new PagedKVCache({ layers: 1, numPages, pageSize, kvHeads: 1, headDim: 1, dtype: written ? 'f16' : 'i8' });
  const seqIds = Array.from({ length: BATCH }, () => cache.addSequence());
  const step = cache.beginStep(seqIds.map((seq) => ({ seq, tokens: TOKENS })));
  if (written) {
    const k = Tensor.zeros([BATCH * TOKENS, 1, 1], { dtype: 'f16' });
    step.append(0, k, k);
    k.dispose();
  }
  step.dispose();
  return { cache, seqIds };
}

/** Groups of benchmarks; each makes its own fixture, so that no group's memory slows another's. */
const groups = [
  () => {
    const allocator = new BlockAllocator(1 << 16);
    const held = allocator.allocateMany(1 << 15);
    let i = 0;
    return {
      cases: {
        'allocator: allocate + release': () => allocator.release(allocator.allocate()),
        'allocator: retain + release (shared page)': () => {
          const page = held[i++ & 0x7fff];
          allocator.retain(page);
          allocator.release(page);
        },
        'allocator: allocateMany(256) + release each': () => {
          const pages = allocator.allocateMany(256);
          for (let p = 0; p < 256; p++) allocator.release(pages[p]);
        },
      },
      dispose() {},
    };
  },
  () => {
    const cache = new PagedKVCache({ layers: 1, numPages: 1 << 14, pageSize: 16, kvHeads: 1, headDim: 1, dtype: 'i8' });
    const parent = cache.addSequence();
    cache.beginStep([{ seq: parent, tokens: 4000 }]).dispose();
    return { cases: { 'cache: fork + free of a 4000-token sequence': () => cache.free(cache.fork(parent)) }, dispose: () => cache.dispose() };
  },
  ...[16, 64].map((pageSize) => () => {
    const { cache, seqIds } = fullCache(pageSize);
    const built = cache.pageTable(seqIds);
    // Two orders of the same sequences: each build follows one of the other batch, so every row is copied.
    const batches = [seqIds, seqIds.slice().reverse()];
    let flip = 0;
    const shape = `${BATCH} x ${TOKENS} tokens, page size ${pageSize}`;
    return {
      cases: {
        [`pageTable, every row copied (reused buffers, batch not the last built): ${shape}`]: () => cache.pageTable(batches[(flip ^= 1)], { reuseBuffers: true }),
        [`pageTable, the same batch again, unchanged (reused buffers): ${shape}`]: () => cache.pageTable(seqIds, { reuseBuffers: true }),
        [`pageTable (new arrays): ${shape}`]: () => cache.pageTable(seqIds),
        [`stagePageTable (the same batch again + native check and copy to cpu): ${shape}`]: () => cache.stagePageTable(seqIds).dispose(),
        [`ops.StagedPageTable of a built table (native check and copy only): ${shape}`]: () => new ops.StagedPageTable(built, 'cpu').dispose(),
      },
      dispose: () => cache.dispose(),
    };
  }),
];

/**
 * The build of the same batch at decode steps, timed around the build alone. The growth between builds
 * is a single-sequence append per row, which does not touch the reused buffers but leaves the CPU's
 * caches colder than a step's own growth would (more so the more rows it grows). Before each build
 * every `stride`-th row gains a page, starting one row further each step: stride = pageSize is a batch
 * of spread lengths growing a token a step (BATCH / pageSize rows cross a page boundary, spread over
 * the batch), stride = 1 all rows crossing at once. Returns the median and spread over the steps.
 */
function timeDecodeSteps(pageSize, stride) {
  const { cache, seqIds } = fullCache(pageSize, { extraPages: BATCH * DECODE_HEADROOM, written: true });
  const k = Tensor.zeros([pageSize, 1, 1], { dtype: 'f16' });
  const times = [];
  let grown = 0;
  for (let step = 0; step < DECODE_STEPS; step++) {
    if (grown + BATCH / stride > BATCH * DECODE_HEADROOM) {
      for (const seq of seqIds) cache.truncate(seq, TOKENS);
      cache.pageTable(seqIds, { reuseBuffers: true });
      grown = 0;
    }
    for (let row = step % stride; row < BATCH; row += stride) cache.append(seqIds[row], 0, k, k);
    grown += BATCH / stride;
    const start = performance.now();
    cache.pageTable(seqIds, { reuseBuffers: true });
    times.push((performance.now() - start) * 1e3);
  }
  k.dispose();
  cache.dispose();
  return spread(times);
}

/**
 * A whole decode step as an engine takes it, timed around beginStep (entry checks, growth, the
 * page-table build, native staging): every sequence gets one token, their lengths spread over a page so
 * that BATCH / pageSize rows cross a page boundary each step; the keys are appended after (untimed).
 */
function timeBeginStep(pageSize) {
  const cache = new PagedKVCache({ layers: 1, numPages: (BATCH * (TOKENS + 2 * pageSize + DECODE_STEPS)) / pageSize, pageSize, kvHeads: 1, headDim: 1, dtype: 'f16' });
  const seqIds = Array.from({ length: BATCH }, () => cache.addSequence());
  const lengths = seqIds.map((_, b) => TOKENS + (b % pageSize));
  const first = cache.beginStep(seqIds.map((seq, b) => ({ seq, tokens: lengths[b] })));
  const prompt = Tensor.zeros([lengths.reduce((a, n) => a + n, 0), 1, 1], { dtype: 'f16' });
  first.append(0, prompt, prompt);
  prompt.dispose();
  first.dispose();
  const k = Tensor.zeros([BATCH, 1, 1], { dtype: 'f16' });
  const entries = seqIds.map((seq) => ({ seq, tokens: 1 }));
  const times = [];
  for (let step = 0; step < DECODE_STEPS; step++) {
    const start = performance.now();
    const decode = cache.beginStep(entries);
    times.push((performance.now() - start) * 1e3);
    decode.append(0, k, k);
    decode.dispose();
  }
  k.dispose();
  cache.dispose();
  return spread(times);
}

/** Median, 10th and 90th percentiles of `times` (µs). */
function spread(times) {
  times.sort((a, b) => a - b);
  const at = (q) => times[Math.floor(q * (times.length - 1))];
  return { medianUs: at(0.5), p10Us: at(0.1), p90Us: at(0.9), steps: times.length };
}

function main() {
  const results = [];
  for (const makeGroup of groups) {
    const group = makeGroup();
    const suite = new Benchmark.Suite();
    for (const [name, fn] of Object.entries(group.cases)) suite.add(name, fn);
    suite
      .on('cycle', (event) => {
        const b = event.target;
        const result = { name: b.name, opsPerSec: Math.round(b.hz), meanUs: b.stats.mean * 1e6, rmePercent: b.stats.rme, samples: b.stats.sample.length };
        results.push(result);
        console.log(`${b.name}: ${result.opsPerSec.toLocaleString()} ops/s, ${result.meanUs.toFixed(2)} µs ±${result.rmePercent.toFixed(1)}%`);
      })
      .run({ async: false });
    group.dispose();
  }
  const meanUs = (prefix, pageSize) => results.find((r) => r.name.startsWith(prefix) && r.name.endsWith(`page size ${pageSize}`)).meanUs;
  const build = [16, 64].map((pageSize) => {
    const decode = { rowsGainingAPage: BATCH / pageSize, ...timeDecodeSteps(pageSize, pageSize) };
    const allRows = { rowsGainingAPage: BATCH, ...timeDecodeSteps(pageSize, 1) };
    const beginStep = { rowsGainingAPage: BATCH / pageSize, ...timeBeginStep(pageSize) };
    return {
      batch: BATCH,
      tokens: TOKENS,
      pageSize,
      targetUs: 50,
      everyRowCopiedUs: meanUs('pageTable, every row copied', pageSize),
      sameBatchUnchangedUs: meanUs('pageTable, the same batch again', pageSize),
      decodeStep: decode,
      decodeStepAllRowsCrossAPage: allRows,
      wholeBeginStep: beginStep,
    };
  });
  for (const b of build) {
    console.log(
      `page-table build, ${BATCH} x ${TOKENS} tokens, page size ${b.pageSize} (target ${b.targetUs} µs): every row copied ${b.everyRowCopiedUs.toFixed(1)} µs, ` +
        `same batch unchanged ${b.sameBatchUnchangedUs.toFixed(1)} µs, decode step (${b.decodeStep.rowsGainingAPage} rows gained a page) ${b.decodeStep.medianUs.toFixed(1)} µs, ` +
        `every row gained a page ${b.decodeStepAllRowsCrossAPage.medianUs.toFixed(1)} µs, whole beginStep ${b.wholeBeginStep.medianUs.toFixed(0)} µs (medians of ${DECODE_STEPS} steps)`,
    );
  }
  const date = new Date().toISOString().slice(0, 10);
  const out = path.join(__dirname, 'results', `cache-${date}-cpu.json`);
  fs.mkdirSync(path.dirname(out), { recursive: true });
  const report = { date: new Date().toISOString(), node: process.version, cpu: os.cpus()[0]?.model, cores: os.cpus().length, loadAverage: os.loadavg()[0], pageTableBuild: build, results };
  fs.writeFileSync(out, `${JSON.stringify(report, null, 2)}\n`);
  console.log(`wrote ${path.relative(process.cwd(), out)}`);
}

main();
