#!/usr/bin/env node
// `npm run bench:gpu`: kvflash and the PyTorch baselines at the same shapes, in one run on one GPU.
// Writes attention-<date>-<gpu>.json and .svg (ratios per shape), quest-<date>-<gpu>.json and
// quant-decode-<date>-<gpu>.json to --out-dir (default bench/results) and prints the tables. Progress goes to stderr as each suite finishes.
'use strict';
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const args = process.argv.slice(2);
const outDir = args.includes('--out-dir') ? args[args.indexOf('--out-dir') + 1] : path.join(__dirname, 'results');
const python = process.env.PYTHON || 'python3';

function runJson(command, argv, label) {
  process.stderr.write(`running ${label}...\n`);
  const started = Date.now();
  const out = execFileSync(command, argv, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'], maxBuffer: 1 << 26 });
  process.stderr.write(`${label} done in ${((Date.now() - started) / 1000).toFixed(0)} s\n`);
  return JSON.parse(out.trim().split('\n').pop());
}

const kvflash = runJson(process.execPath, [path.join(__dirname, 'attention.js')], 'kvflash suite');
const quest = runJson(process.execPath, [path.join(__dirname, 'quest.js')], 'Quest suite');
const quant = runJson(process.execPath, [path.join(__dirname, 'quant-decode.js')], 'quantized decode suite');
const torch = runJson(python, [path.join(__dirname, 'baselines', 'attention.py')], 'PyTorch baselines');

const metricOf = (r) => (r.suite === 'prefill' ? r.tflops : r.tbps);
const rows = kvflash.results.map((r) => {
  const base = (backend) => torch.results.find((t) => t.name === r.name && t.backend === backend);
  const flash = base('flash'), cudnn = base('cudnn');
  return {
    suite: r.suite,
    name: r.name,
    unit: r.suite === 'prefill' ? 'TFLOP/s' : 'TB/s',
    kvflash: { ms: r.ms, value: metricOf(r) },
    flash: flash?.error ? { error: flash.error } : { ms: flash?.ms, value: flash && metricOf(flash) },
    cudnn: cudnn?.error ? { error: cudnn.error } : { ms: cudnn?.ms, value: cudnn && metricOf(cudnn) },
    vsFlash: flash?.ms ? flash.ms / r.ms : null,
    vsCudnn: cudnn?.ms ? cudnn.ms / r.ms : null,
  };
});
const copy = torch.results.find((t) => t.suite === 'copy');
const date = new Date().toISOString().slice(0, 10);
const gpu = kvflash.device.replace(/^NVIDIA\s+/, '').split(/\s+/)[0].toLowerCase();
const report = {
  date,
  device: kvflash.device,
  computeCapability: kvflash.computeCapability,
  torch: torch.torch,
  method: 'CUDA events, 5 warm-up runs, median of 30; L2 flushed before each decode run by reading (not writing) 4x its size; a busy kernel queued before each run so host preparation is not timed. Ratios are baseline time / kvflash time (>1: kvflash faster). Decode pages are scattered at random over the pool; the baselines read contiguous K/V.',
  shapes: JSON.parse(fs.readFileSync(path.join(__dirname, 'shapes.json'), 'utf8')),
  copyCeilingTBps: copy?.tbps,
  rows,
  raw: { kvflash: kvflash.results, torch: torch.results },
};

function chart(rows) {
  const width = 900, rowH = 34, left = 250, top = 40, scaleMax = Math.max(2, ...rows.flatMap((r) => [r.vsFlash ?? 0, r.vsCudnn ?? 0]));
  const x = (ratio) => left + (ratio / scaleMax) * (width - left - 60);
  const bars = rows.map((r, i) => {
    const y = top + i * rowH;
    const bar = (ratio, dy, color, label) =>
      ratio == null ? '' : `<rect x="${left}" y="${y + dy}" width="${x(ratio) - left}" height="12" fill="${color}"/><text x="${x(ratio) + 4}" y="${y + dy + 10}" font-size="10">${ratio.toFixed(2)}x ${label}</text>`;
    return `<text x="${left - 8}" y="${y + 16}" font-size="12" text-anchor="end">${r.name}</text>${bar(r.vsFlash, 2, '#4c78a8', 'vs torch flash')}${bar(r.vsCudnn, 16, '#f58518', 'vs cuDNN')}`;
  });
  const height = top + rows.length * rowH + 30;
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" font-family="sans-serif">
<text x="10" y="20" font-size="14">kvflash attention speed relative to PyTorch SDPA on ${report.device} (${date}); higher is better</text>
<line x1="${x(1)}" y1="${top - 6}" x2="${x(1)}" y2="${height - 24}" stroke="#888" stroke-dasharray="4 3"/>
<text x="${x(1)}" y="${height - 10}" font-size="10" text-anchor="middle">1.0x</text>
${bars.join('\n')}
</svg>
`;
}

fs.mkdirSync(outDir, { recursive: true });
const base = path.join(outDir, `attention-${date}-${gpu}`);
fs.writeFileSync(`${base}.json`, JSON.stringify(report, null, 2) + '\n');
fs.writeFileSync(`${base}.svg`, chart(rows));
const questReport = {
  date,
  device: quest.device,
  method: 'B=1, H=32, Hkv=8, D=128, bf16, page 16, pages scattered; Quest = questDecodeAttention (scores, top-k and the sparse decode in one kernel); threeOps = questScores + topkPages + pagedDecodeAttention over the selection, timed together; full = pagedDecodeAttention over every page; CUDA events, median of 30, L2 flushed by reads before each run. Recall is measured by bench/quest-quality.js.',
  results: quest.results,
};
const questFile = path.join(outDir, `quest-${date}-${gpu}.json`);
fs.writeFileSync(questFile, JSON.stringify(questReport, null, 2) + '\n');

const quantReport = {
  date,
  device: quant.device,
  method: 'Paged-decode shapes of bench/shapes.json, pages scattered; each format quantizes the same pages (group size 32, f16 statistics); each sequence keeps its last page in bf16 (the tail pool). speedup = bf16 paged decode time / quantized decode time, both from this run; bytesPerToken = codes + statistics of K and V over all KV heads of one layer; byteRatio = bf16 bytes / format bytes; efficiency = speedup / byteRatio. CUDA events, median of 30, L2 flushed by reads before each run.',
  results: quant.results,
};
const quantFile = path.join(outDir, `quant-decode-${date}-${gpu}.json`);
fs.writeFileSync(quantFile, JSON.stringify(quantReport, null, 2) + '\n');

const fmt = (v) => (v == null ? '-' : v.toFixed(2));
console.log(`\n${report.device}, ${date}, torch ${report.torch}; copy ceiling ${fmt(copy?.tbps)} TB/s`);
console.log('| shape | unit | kvflash | torch flash | cuDNN | vs flash | vs cuDNN |');
console.log('| --- | --- | --- | --- | --- | --- | --- |');
for (const r of rows) {
  console.log(`| ${r.name} | ${r.unit} | ${fmt(r.kvflash.value)} | ${r.flash.error ? 'error' : fmt(r.flash.value)} | ${r.cudnn.error ? 'error' : fmt(r.cudnn.value)} | ${fmt(r.vsFlash)} | ${fmt(r.vsCudnn)} |`);
}
console.log('\n| Quest context | budget (tokens) | full decode µs | Quest µs | speedup | three ops µs | scores / top-k / sparse µs |');
console.log('| --- | --- | --- | --- | --- | --- | --- |');
for (const r of quest.results) {
  const st = r.stagesUs;
  console.log(`| ${r.length} | ${r.budgetTokens} | ${r.fullUs.toFixed(1)} | ${r.questUs.toFixed(1)} | ${r.speedup.toFixed(2)}x | ${r.threeOpsUs.toFixed(1)} | ${st.scores.toFixed(1)} / ${st.topk.toFixed(1)} / ${st.sparseDecode.toFixed(1)} |`);
}
console.log('\n| quantized decode | bf16 µs | ' + Object.keys(quant.results[0].formats).map((f) => `${f} µs (speedup, byte ratio)`).join(' | ') + ' |');
console.log('| --- | --- |' + ' --- |'.repeat(Object.keys(quant.results[0].formats).length));
for (const r of quant.results) {
  const cells = Object.values(r.formats).map((f) => `${f.us.toFixed(1)} (${f.speedup.toFixed(2)}x, ${f.byteRatio.toFixed(2)}x)`);
  console.log(`| ${r.name} | ${r.bf16Us.toFixed(1)} | ${cells.join(' | ')} |`);
}
console.log(`\nwrote ${base}.json, ${base}.svg, ${questFile} and ${quantFile}`);
