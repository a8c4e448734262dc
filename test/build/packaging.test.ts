// The two build files and the two module systems must agree.
import { readFileSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import * as path from 'node:path';

import { describe, expect, it } from 'vitest';

import * as lib from '../../lib/index';

const root = path.join(__dirname, '..', '..');

function cmakeList(name: string): string[] {
  const cmake = readFileSync(path.join(root, 'CMakeLists.txt'), 'utf8');
  const match = cmake.match(new RegExp(`set\\(${name}\\n([^)]*)\\)`));
  if (!match) throw new Error(`no ${name} in CMakeLists.txt`);
  return match[1]!.split('\n').map((l) => l.trim()).filter(Boolean);
}

describe('packaging', () => {
  it('builds the CPU addon from the same sources with cmake-js and node-gyp', () => {
    const gyp = JSON.parse(readFileSync(path.join(root, 'binding.gyp'), 'utf8'));
    const gypSources: string[] = gyp.targets[0].sources;
    expect([...gypSources].sort()).toEqual([...cmakeList('KVFLASH_SOURCES'), ...cmakeList('KVFLASH_CPU_ONLY_SOURCES')].sort());
  });

  it('exports the same names from the ESM and CommonJS entry points', () => {
    // Asked of a plain Node process: what matters is Node's own ESM loader, not vitest's.
    const script = `
      import { createRequire } from 'node:module';
      const esm = await import('kvflash');
      const cjs = createRequire(import.meta.url)('kvflash');
      console.log(JSON.stringify({ esm: Object.keys(esm).sort(), cjs: Object.keys(cjs).filter((n) => n !== '__esModule').sort(), same: esm.Tensor === cjs.Tensor }));`;
    const out = JSON.parse(execFileSync(process.execPath, ['--input-type=module', '-e', script], { cwd: root, encoding: 'utf8' }));
    const names = Object.keys(lib).sort();
    expect(out.esm).toEqual(names);
    expect(out.cjs).toEqual(names);
    expect(out.same).toBe(true); // one copy of each class for both module systems
  });
});
