import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';

import { defineConfig } from 'vitest/config';

// GPU suites (test/cuda) are part of the run only where the CUDA backend would be chosen (see
// lib/native.ts); elsewhere they are left out rather than skipped, so a run reports only tests that ran.
function cudaDeviceAnswers(): boolean {
  if (process.env.KVFLASH_BACKEND === 'cpu') return false;
  const binary = new URL('./build/cuda/kvflash_cuda.node', import.meta.url);
  if (!existsSync(binary)) return false;
  const build = createRequire(import.meta.url)(binary.pathname) as { buildInfo(): { deviceCount: number } };
  return build.buildInfo().deviceCount > 0;
}

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    exclude: cudaDeviceAnswers() ? [] : ['test/cuda/**'],
    testTimeout: 60_000,
    reporters: ['default', ['json', { outputFile: 'test-results.json' }]],
  },
});
