// Quest test helpers: exact q·k per page from the contiguous keys of a paged cache, and the
// selection rule written as a sort.
import type { PagedCache } from './attention-fixtures';

/** max over the query heads of KV head h's group of max over the page's keys of q·k, per page entry. */
export function truePageMaxima(cache: PagedCache, lengths: number[], q: Float32Array, heads: number, kvHeads: number, dim: number): Float64Array {
  const group = heads / kvHeads;
  const out = new Float64Array(cache.indices.length * kvHeads).fill(-Infinity);
  let token = 0;
  lengths.forEach((len, b) => {
    for (let j = 0; j < len; j++, token++) {
      const entry = cache.indptr[b]! + Math.floor(j / cache.pageSize);
      for (let h = 0; h < kvHeads; h++) {
        for (let g = 0; g < group; g++) {
          let dot = 0;
          for (let d = 0; d < dim; d++) dot += q[(b * heads + h * group + g) * dim + d]! * cache.k[(token * kvHeads + h) * dim + d]!;
          out[entry * kvHeads + h] = Math.max(out[entry * kvHeads + h]!, dot);
        }
      }
    }
  });
  return out;
}

/** The selection rule: per (sequence, KV head), last page + budget-1 best others (earlier first on ties), in page order. */
export function selectPages(scores: Float32Array, indptr: Int32Array, indices: Int32Array, kvHeads: number, budget: number): number[] {
  const out: number[] = [];
  for (let b = 0; b + 1 < indptr.length; b++) {
    const begin = indptr[b]!, n = indptr[b + 1]! - begin;
    for (let h = 0; h < kvHeads; h++) {
      let chosen = Array.from({ length: n }, (_, j) => j);
      if (n > budget) {
        const others = chosen.slice(0, n - 1).sort((x, y) => scores[(begin + y) * kvHeads + h]! - scores[(begin + x) * kvHeads + h]! || x - y);
        chosen = [...others.slice(0, budget - 1), n - 1].sort((x, y) => x - y);
      }
      out.push(...chosen.map((j) => indices[begin + j]!));
    }
  }
  return out;
}
