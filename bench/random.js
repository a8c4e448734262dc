// Seeded random numbers for the benchmarks, so every run measures the same data.
'use strict';

/** A uniform [0, 1) generator (mulberry32). */
function uniformRandom(seed) {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** A unit-normal generator (Box-Muller over uniformRandom). */
function normalRandom(seed) {
  const uniform = uniformRandom(seed);
  return () => Math.sqrt(-2 * Math.log(1 - uniform())) * Math.cos(2 * Math.PI * uniform());
}

module.exports = { normalRandom, uniformRandom };
