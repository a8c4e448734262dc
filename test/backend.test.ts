import { describe, expect, it } from 'vitest';

import { backend } from '../lib/index';

describe('backend()', () => {
  it('says which binary was chosen and why', () => {
    const info = backend();
    expect(['cpu', 'cuda']).toContain(info.name);
    expect(info.reason.length).toBeGreaterThan(10);
    if (info.name === 'cpu') {
      expect(info.device).toBeUndefined();
      expect(info.reason).toMatch(/^CPU build: /);
      expect(info.path).toMatch(/kvflash\.node$/);
    } else {
      expect(info.computeCapability).toMatch(/^\d+\.\d+$/);
      expect(info.path).toMatch(/kvflash_cuda\.node$/);
    }
  });
});
