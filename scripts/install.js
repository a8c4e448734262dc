#!/usr/bin/env node
// The package's install step: builds what fits this machine and says in one line what it built.
//   - nvcc found: cmake-js builds the CPU addon and the CUDA addon.
//   - no nvcc, and a prebuilt CPU binary fits: use it, build nothing.
//   - otherwise: cmake-js builds the CPU addon.
// The full build log goes to build/install.log; it is printed only when the build fails.
// KVFLASH_CUDA=0 skips CUDA; KVFLASH_CUDA_ARCHS="90a" narrows the GPU targets.
'use strict';
const { spawnSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const root = path.join(__dirname, '..');

function findNvcc() {
  const candidates = [];
  if (process.env.CUDACXX) candidates.push(process.env.CUDACXX);
  for (const dir of (process.env.PATH || '').split(path.delimiter)) if (dir) candidates.push(path.join(dir, 'nvcc'));
  for (const home of [process.env.CUDA_HOME, process.env.CUDA_PATH, '/usr/local/cuda']) {
    if (home) candidates.push(path.join(home, 'bin', 'nvcc'));
  }
  return candidates.find((p) => fs.existsSync(p));
}

function prebuiltCpuBinary() {
  try {
    return require('node-gyp-build').path(root);
  } catch {
    return undefined;
  }
}

const wantCuda = process.env.KVFLASH_CUDA !== '0';
const nvcc = wantCuda ? findNvcc() : undefined;
if (!nvcc) {
  // A CUDA addon left by an earlier build would still be chosen at load time: this build has none.
  fs.rmSync(path.join(root, 'build', 'cuda'), { recursive: true, force: true });
  const prebuilt = prebuiltCpuBinary();
  if (prebuilt && prebuilt.includes(`${path.sep}prebuilds${path.sep}`)) {
    console.log(`kvflash: using the prebuilt CPU binary ${path.relative(root, prebuilt)} (no nvcc found: no CUDA backend)`);
    process.exit(0);
  }
}

const started = Date.now();
const cmakeJs = require.resolve('cmake-js/bin/cmake-js');
const env = { ...process.env };
if (nvcc) env.CUDACXX = nvcc;
// Configure every time (an existing build keeps its old options otherwise), then build.
const run = (args) => spawnSync(process.execPath, [cmakeJs, ...args], { cwd: root, env, encoding: 'utf8', maxBuffer: 1 << 28 });
const configured = run(['configure', `--CDKVFLASH_CUDA=${nvcc ? 'ON' : 'OFF'}`]);
const result = configured.status === 0 ? run(['build', '--parallel', String(Math.max(1, os.cpus().length))]) : configured;
fs.mkdirSync(path.join(root, 'build'), { recursive: true });
fs.writeFileSync(path.join(root, 'build', 'install.log'), `${configured.stdout}\n${configured.stderr}\n${result.stdout}\n${result.stderr}`);
const seconds = ((Date.now() - started) / 1000).toFixed(0);
if (result.status !== 0) {
  console.error(`${result.stdout}\n${result.stderr}`.split('\n').slice(-60).join('\n'));
  console.error(`kvflash: native build failed after ${seconds} s (full log: build/install.log)`);
  process.exit(1);
}
const cudaBuilt = fs.existsSync(path.join(root, 'build', 'cuda', 'kvflash_cuda.node'));
const archs = (configured.stdout.match(/kvflash: CUDA addon for ([^\n]*)/) || [])[1];
console.log(
  cudaBuilt && nvcc
    ? `kvflash: built the CPU backend and the CUDA backend (${archs}) with ${nvcc} in ${seconds} s`
    : `kvflash: built the CPU backend in ${seconds} s (${nvcc ? 'CUDA build skipped' : 'no nvcc found: no CUDA backend'})`,
);
