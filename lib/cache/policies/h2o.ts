/**
 * H2O, heavy-hitter oracle (Zhang et al., 2023), page-granular: a sequence keeps at most
 * `budgetPages` pages, its `recentPages` newest always, and among the older ones those that have
 * drawn the most attention mass so far (fed by cache.recordAttentionMass).
 */
import { checkPositiveInteger } from '../block-allocator';
import { invalid } from '../../errors';
import { EvictionPolicy, SequenceView } from './policy';

export interface H2OOptions {
  /** Most pages a sequence holds. */
  budgetPages: number;
  /** Newest pages kept whatever their mass (1 or more, less than budgetPages). */
  recentPages: number;
}

export class H2O implements EvictionPolicy {
  readonly name = 'h2o';
  readonly budgetPages: number;
  readonly recentPages: number;

  constructor(opts: H2OOptions) {
    this.budgetPages = checkPositiveInteger(opts?.budgetPages, 'budgetPages');
    const recent = opts.recentPages;
    if (typeof recent !== 'number' || !Number.isInteger(recent) || recent < 1 || recent >= this.budgetPages) {
      throw invalid('E_RANGE', 'recentPages', `integer in [1, ${this.budgetPages - 1}] (below budgetPages)`, recent);
    }
    this.recentPages = recent;
  }

  onGrow(view: SequenceView): Int32Array {
    const excess = view.pagesAfter - this.budgetPages;
    if (excess <= 0) return new Int32Array(0);
    const candidates = Math.min(view.evictable, view.pagesAfter - this.recentPages);
    if (candidates <= 0) return new Int32Array(0);
    const order = Array.from({ length: candidates }, (_, i) => i);
    // Lightest first; on equal mass the older page goes first.
    order.sort((a, b) => view.mass[a]! - view.mass[b]! || a - b);
    return Int32Array.from(order.slice(0, excess)).sort();
  }
}
