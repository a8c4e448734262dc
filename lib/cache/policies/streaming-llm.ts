/**
 * StreamingLLM (Xiao et al., 2023), page-granular: a sequence keeps its first `sinkPages` pages
 * (the attention sinks) and its last `windowPages` pages; the pages between are dropped as it grows.
 */
import { checkPositiveInteger } from '../block-allocator';
import { invalid } from '../../errors';
import { EvictionPolicy, SequenceView, slotRange } from './policy';

export interface StreamingLLMOptions {
  /** Pages kept at the start of every sequence (0 or more). */
  sinkPages: number;
  /** Most recent pages kept (1 or more: the page being written is always one of them). */
  windowPages: number;
}

export class StreamingLLM implements EvictionPolicy {
  readonly name = 'streaming-llm';
  readonly sinkPages: number;
  readonly windowPages: number;

  constructor(opts: StreamingLLMOptions) {
    const sinks = opts?.sinkPages;
    if (typeof sinks !== 'number' || !Number.isInteger(sinks) || sinks < 0) throw invalid('E_RANGE', 'sinkPages', 'non-negative integer', sinks);
    this.sinkPages = sinks;
    this.windowPages = checkPositiveInteger(opts.windowPages, 'windowPages');
  }

  onGrow(view: SequenceView): Int32Array {
    const excess = view.pagesAfter - this.sinkPages - this.windowPages;
    if (excess <= 0) return new Int32Array(0);
    // The oldest pages after the sinks go first; only those already complete on every layer.
    return slotRange(this.sinkPages, Math.min(this.sinkPages + excess, view.evictable));
  }
}
