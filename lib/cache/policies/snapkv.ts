/**
 * SnapKV (Li et al., 2024), page-granular: after prefill, the attention that the prompt's last
 * tokens (the observation window) paid to each earlier token is pooled over neighbouring tokens and
 * summed per page; each KV head keeps its `capacityPages` best pages plus the window pages.
 *
 * The paged kernels read one page table for all heads, so the sequence keeps the union of the
 * heads' choices (at most kvHeads * capacityPages + windowPages pages); each head's own choice is
 * returned as plain slot lists for a kernel that reads per-head tables.
 */
import { checkPositiveInteger } from '../block-allocator';
import { invalid } from '../../errors';
import { Compression, EvictionPolicy, ObservationScores, SequenceView } from './policy';

export interface SnapKVOptions {
  /** Last pages of the prompt (the observation window), always kept. */
  windowPages: number;
  /** Pages each KV head keeps before the window. */
  capacityPages: number;
  /** Tokens in the pooling kernel, odd; default 7 as in the paper. */
  kernelSize?: number;
  /** Default 'max'. */
  pooling?: 'max' | 'avg';
}

export class SnapKV implements EvictionPolicy {
  readonly name = 'snapkv';
  readonly windowPages: number;
  readonly capacityPages: number;
  readonly kernelSize: number;
  readonly pooling: 'max' | 'avg';

  constructor(opts: SnapKVOptions) {
    this.windowPages = checkPositiveInteger(opts?.windowPages, 'windowPages');
    this.capacityPages = checkPositiveInteger(opts.capacityPages, 'capacityPages');
    const kernel = opts.kernelSize ?? 7;
    if (typeof kernel !== 'number' || !Number.isInteger(kernel) || kernel < 1 || kernel % 2 === 0) throw invalid('E_RANGE', 'kernelSize', 'odd positive integer', kernel);
    this.kernelSize = kernel;
    const pooling = opts.pooling ?? 'max';
    if (pooling !== 'max' && pooling !== 'avg') throw invalid('E_RANGE', 'pooling', "'max' or 'avg'", pooling);
    this.pooling = pooling;
  }

  /** SnapKV compresses once, on request; growth never evicts. */
  onGrow(): Int32Array {
    return new Int32Array(0);
  }

  compress(view: SequenceView, scores: ObservationScores): Compression {
    const pages = view.pagesAfter;
    const prefixEnd = Math.max(0, Math.min(view.evictable, pages - this.windowPages));
    const kept = new Uint8Array(pages).fill(1, prefixEnd);
    const headChoices = scores.map((headScores) => {
      const pageScores = this.pageScores(this.pool(headScores), prefixEnd, view.pageSize);
      const order = Array.from({ length: prefixEnd }, (_, i) => i);
      // Highest score first; on a tie the older page wins.
      order.sort((a, b) => pageScores[b]! - pageScores[a]! || a - b);
      const chosen = order.slice(0, this.capacityPages);
      for (const slot of chosen) kept[slot] = 1;
      return chosen;
    });
    const headSlots = headChoices.map((chosen) => {
      const slots = new Uint8Array(pages).fill(1, prefixEnd);
      for (const slot of chosen) slots[slot] = 1;
      return slotsWhere(slots, 1);
    });
    return { evict: slotsWhere(kept, 0), headSlots };
  }

  private pool(scores: Float32Array): Float32Array {
    const half = (this.kernelSize - 1) / 2;
    const out = new Float32Array(scores.length);
    for (let t = 0; t < scores.length; t++) {
      const from = Math.max(0, t - half), to = Math.min(scores.length, t + half + 1);
      let acc = this.pooling === 'max' ? -Infinity : 0;
      for (let i = from; i < to; i++) acc = this.pooling === 'max' ? Math.max(acc, scores[i]!) : acc + scores[i]!;
      // Average over the full kernel, as a zero-padded avg-pool does at the edges.
      out[t] = this.pooling === 'max' ? acc : acc / this.kernelSize;
    }
    return out;
  }

  private pageScores(pooled: Float32Array, pages: number, pageSize: number): Float64Array {
    const out = new Float64Array(pages);
    for (let p = 0; p < pages; p++) {
      for (let i = p * pageSize; i < (p + 1) * pageSize; i++) out[p]! += pooled[i]!;
    }
    return out;
  }
}

function slotsWhere(flags: Uint8Array, value: number): Int32Array {
  const out: number[] = [];
  flags.forEach((f, i) => {
    if (f === value) out.push(i);
  });
  return Int32Array.from(out);
}
