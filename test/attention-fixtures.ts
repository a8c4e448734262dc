// Test data for attention: seeded random tensors, paged caches with pages scattered over the pool,
// and an independent float64 reference written from the definition.

export function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function normal(n: number, random: () => number): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = Math.sqrt(-2 * Math.log(1 - random())) * Math.cos(2 * Math.PI * random());
  return out;
}

export function offsets(lengths: readonly number[]): Int32Array {
  const out = new Int32Array(lengths.length + 1);
  lengths.forEach((l, i) => (out[i + 1] = out[i]! + l));
  return out;
}

export interface PagedCache {
  pageSize: number;
  numPages: number;
  kPages: Float32Array; // [numPages, P, Hkv, D]
  vPages: Float32Array;
  indptr: Int32Array;
  indices: Int32Array;
  lastPageLen: Int32Array;
  /** The same keys and values, contiguous per sequence: [Σ lengths, Hkv, D]. */
  k: Float32Array;
  v: Float32Array;
}

/** Sequences of the given lengths in a pool of `spare` more pages than needed, pages in shuffled order. */
export function pagedCache(lengths: readonly number[], pageSize: number, kvHeads: number, dim: number, random: () => number, spare = 3): PagedCache {
  const pagesPer = lengths.map((l) => Math.ceil(l / pageSize));
  const used = pagesPer.reduce((a, b) => a + b, 0);
  const numPages = used + spare;
  const order = Array.from({ length: numPages }, (_, i) => i);
  for (let i = numPages - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [order[i], order[j]] = [order[j]!, order[i]!];
  }
  const row = kvHeads * dim;
  const total = lengths.reduce((a, b) => a + b, 0);
  const k = normal(total * row, random);
  const v = normal(total * row, random);
  const kPages = normal(numPages * pageSize * row, random); // unused slots hold noise, never zeros
  const vPages = normal(numPages * pageSize * row, random);
  const indptr = offsets(pagesPer);
  const indices = Int32Array.from(order.slice(0, used));
  const lastPageLen = Int32Array.from(lengths, (l) => l - (Math.ceil(l / pageSize) - 1) * pageSize);
  let token = 0;
  lengths.forEach((len, b) => {
    for (let j = 0; j < len; j++, token++) {
      const page = indices[indptr[b]! + Math.floor(j / pageSize)]!;
      const at = (page * pageSize + (j % pageSize)) * row;
      kPages.set(k.subarray(token * row, (token + 1) * row), at);
      vPages.set(v.subarray(token * row, (token + 1) * row), at);
    }
  });
  return { pageSize, numPages, kPages, vPages, indptr, indices, lastPageLen, k, v };
}

export interface ReferenceInput {
  q: Float32Array; // [Nq, H, D]
  k: Float32Array; // [Nk, Hkv, D]
  v: Float32Array;
  cuSeqlensQ: Int32Array;
  cuSeqlensK: Int32Array;
  heads: number;
  kvHeads: number;
  dim: number;
  causal: boolean;
  windowLeft: number;
  scale: number;
}

/** softmax(scale · q·k) · v per query row, in float64, straight from the definition. */
export function referenceAttention(x: ReferenceInput): { out: Float64Array; lse: Float64Array } {
  const { heads, kvHeads, dim } = x;
  const nq = x.cuSeqlensQ[x.cuSeqlensQ.length - 1]!;
  const out = new Float64Array(nq * heads * dim);
  const lse = new Float64Array(nq * heads);
  for (let b = 0; b + 1 < x.cuSeqlensQ.length; b++) {
    const q0 = x.cuSeqlensQ[b]!, sq = x.cuSeqlensQ[b + 1]! - q0;
    const k0 = x.cuSeqlensK[b]!, sk = x.cuSeqlensK[b + 1]! - k0;
    for (let i = 0; i < sq; i++) {
      const pos = sk - sq + i;
      const last = x.causal ? pos : sk - 1;
      const first = x.windowLeft >= 0 ? Math.max(0, pos - x.windowLeft) : 0;
      for (let h = 0; h < heads; h++) {
        const kh = Math.floor(h / (heads / kvHeads));
        const qAt = ((q0 + i) * heads + h) * dim;
        const logits: number[] = [];
        for (let j = first; j <= last; j++) {
          let dot = 0;
          for (let d = 0; d < dim; d++) dot += x.q[qAt + d]! * x.k[((k0 + j) * kvHeads + kh) * dim + d]!;
          logits.push(dot * x.scale);
        }
        const max = Math.max(...logits);
        const weights = logits.map((l) => Math.exp(l - max));
        const sum = weights.reduce((a, w) => a + w, 0);
        for (let j = first; j <= last; j++) {
          const w = weights[j - first]! / sum;
          for (let d = 0; d < dim; d++) out[qAt + d]! += w * x.v[((k0 + j) * kvHeads + kh) * dim + d]!;
        }
        lse[(q0 + i) * heads + h] = logits.length ? max + Math.log(sum) : -Infinity;
      }
    }
  }
  return { out, lse };
}

export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`length ${a.length} != ${b.length}`);
  let m = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i]! - b[i]!);
    if (Number.isNaN(d)) return NaN;
    m = Math.max(m, d);
  }
  return m;
}
