// Microbenchmarks of the cache managers (host-side bookkeeping, no kernels): allocator operations
// per second and the per-step page-table build for 1024 sequences of 4096 tokens (target < 50 µs).
// Writes bench/results/cache-<date>-cpu.json; run `npm run build:ts` first.
'use strict';
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const Benchmark = require('benchmark');
const { BlockAllocator, PagedKVCache, ops } = require('../dist/cjs/index.js');

const BATCH = 1024;
const TOKENS = 4096;

/** A cache whose pools are as small as a page allows: the page table does not depend on head sizes. */
function fullCache(pageSize) {
  const numPages = (BATCH * TOKENS) / pageSize;
  const cache = new PagedKVCache({ layers: 1, numPages, pageSize, kvHeads: 1, headDim: 1, dtype: 'i8' });
  const seqIds = Array.from({ length: BATCH }, () => cache.addSequence());
  // Reserve every sequence's pages in one step (no keys written: the table only needs the pages).
  cache.beginStep(seqIds.map((seq) => ({ seq, tokens: TOKENS }))).dispose();
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
    const shape = `${BATCH} x ${TOKENS} tokens, page size ${pageSize}`;
    return {
      cases: {
        [`pageTable (reused buffers): ${shape}`]: () => cache.pageTable(seqIds, { reuseBuffers: true }),
        [`pageTable (new arrays): ${shape}`]: () => cache.pageTable(seqIds),
        [`stagePageTable (build + native check and copy to cpu): ${shape}`]: () => cache.stagePageTable(seqIds).dispose(),
        [`ops.StagedPageTable of a built table (native check and copy only): ${shape}`]: () => new ops.StagedPageTable(built, 'cpu').dispose(),
      },
      dispose: () => cache.dispose(),
    };
  }),
];

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
  const date = new Date().toISOString().slice(0, 10);
  const build = [16, 64].map((pageSize) => {
    const { meanUs } = results.find((r) => r.name.startsWith('pageTable (reused buffers)') && r.name.endsWith(`page size ${pageSize}`));
    return { batch: BATCH, tokens: TOKENS, pageSize, buildUs: meanUs, targetUs: 50 };
  });
  for (const b of build) console.log(`page-table build, ${BATCH} x ${TOKENS} tokens, page size ${b.pageSize}: ${b.buildUs.toFixed(1)} µs (target ${b.targetUs})`);
  const out = path.join(__dirname, 'results', `cache-${date}-cpu.json`);
  fs.mkdirSync(path.dirname(out), { recursive: true });
  const report = { date: new Date().toISOString(), node: process.version, cpu: os.cpus()[0]?.model, cores: os.cpus().length, loadAverage: os.loadavg()[0], pageTableBuild: build, results };
  fs.writeFileSync(out, `${JSON.stringify(report, null, 2)}\n`);
  console.log(`wrote ${path.relative(process.cwd(), out)}`);
}

main();
