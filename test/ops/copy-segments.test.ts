// copySegments, the native gather behind the cache's page-table builds: every segment lands where
// its offsets say, from any place of the source (the same buffer too), and bad input is refused with
// the argument named before anything is written.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';

import { copySegments } from '../../lib/ops/page-table';
import { codeOf } from '../cache/fixtures';

describe('copySegments', () => {
  it('copies segment i of src, from starts[i], to dst[offsets[i], offsets[i+1]) for every i', () => {
    fc.assert(
      fc.property(fc.array(fc.record({ start: fc.nat({ max: 60 }), length: fc.nat({ max: 8 }) }), { minLength: 1, maxLength: 12 }), (segments) => {
        const src = Int32Array.from({ length: 70 }, (_, i) => 1000 + i);
        const offsets = new Int32Array(segments.length + 1);
        segments.forEach(({ length }, i) => (offsets[i + 1] = offsets[i]! + length));
        const dst = new Int32Array(offsets[segments.length]!);
        copySegments(src, Int32Array.from(segments, (s) => s.start), dst, offsets);
        expect([...dst]).toEqual(segments.flatMap(({ start, length }) => [...src.subarray(start, start + length)]));
      }),
    );
  });

  it('copies between views of one buffer', () => {
    const buffer = Int32Array.from({ length: 16 }, (_, i) => i);
    copySegments(buffer.subarray(0, 8), Int32Array.from([5, 0]), buffer.subarray(6, 11), Int32Array.from([0, 2, 5]));
    expect([...buffer.subarray(6, 11)]).toEqual([5, 6, 0, 1, 2]);
  });

  it('refuses bad input, naming the argument, and writes nothing', () => {
    const src = Int32Array.from([1, 2, 3, 4]);
    const dst = new Int32Array(3);
    const offsets = Int32Array.from([0, 1, 3]);
    const starts = Int32Array.from([0, 2]);
    const refused = (call: () => void, code: string, name: string) => {
      expect(codeOf(call)).toBe(code);
      expect(call).toThrow(name);
      expect([...dst]).toEqual([0, 0, 0]);
    };
    refused(() => copySegments([1, 2] as unknown as Int32Array, starts, dst, offsets), 'E_DTYPE', 'src');
    refused(() => copySegments(src, starts, new Float32Array(3) as unknown as Int32Array, offsets), 'E_DTYPE', 'dst');
    refused(() => copySegments(src, Int32Array.from([0]), dst, offsets), 'E_SHAPE', 'starts');
    refused(() => copySegments(src, starts, dst, Int32Array.from([1, 1, 3])), 'E_RANGE', 'offsets[0]');
    refused(() => copySegments(src, starts, dst, Int32Array.from([0, 2, 1])), 'E_RANGE', 'offsets');
    refused(() => copySegments(src, starts, dst, Int32Array.from([0, 1, 2])), 'E_RANGE', 'offsets');
    refused(() => copySegments(src, Int32Array.from([0, 3]), dst, offsets), 'E_RANGE', 'starts[1]');
    refused(() => copySegments(src, Int32Array.from([-1, 2]), dst, offsets), 'E_RANGE', 'starts[0]');
  });
});
