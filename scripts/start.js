#!/usr/bin/env node
// `npm start`: which backend kvflash chose, on which device, and a tensor round trip there.
'use strict';
const kvflash = require('../dist/cjs/index.js');

async function main() {
  const info = kvflash.backend();
  console.log(`backend: ${info.name}${info.device ? ` (${info.device}, sm ${info.computeCapability})` : ''}`);
  console.log(`reason:  ${info.reason}`);
  const device = info.name === 'cuda' ? 'cuda:0' : 'cpu';
  const values = [1, -0.5, 3.14159, 65504, 1e-3, 448];
  for (const dtype of ['f32', 'f16', 'bf16', 'fp8e4m3']) {
    const t = kvflash.Tensor.fromArray(values, [2, 3], { dtype, device });
    const back = Array.from(await t.toArray(), (v) => Number(v.toPrecision(6)));
    t.dispose();
    console.log(`${dtype.padEnd(8)} on ${device}: [${values.join(', ')}] -> [${back.join(', ')}]`);
  }
  const mem = kvflash.memory(device);
  console.log(`memory on ${device}: ${mem.inUse} B in use, ${mem.cached} B cached, peak ${mem.peak} B`);
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
