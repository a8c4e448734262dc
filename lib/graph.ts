/**
 * CudaGraph: a decoding step (or any run of ops) captured once on a GPU and replayed with one launch.
 *
 * Capture records the work the ops queue instead of running it, so what `fn` returns holds no result
 * until the first replay. A replay reruns that work on the same buffers, reading what they hold then:
 * write the step's inputs into them (q.copyFrom, new keys and values in the pages) and replay. Shapes,
 * page tables (stage them before capturing) and the ops' launch plans are those of the capture.
 *
 * Memory: tensors and page tables the captured ops read must outlive the graph. Blocks allocated during
 * the capture (outputs, scratch) belong to the graph: disposing an output keeps its block for the graph,
 * and dispose() returns them all to the device's cache.
 */
import { callNative, errorAtCaller } from './errors';
import { native } from './native';
import { deviceOrDefault } from './runtime';
import type { DeviceName } from './tensor';

/** Ends a capture whose work is not wanted and frees what it captured; the caller reports why. */
function abandonCapture(device: string): void {
  try {
    native().graphDispose(native().captureEnd(device));
  } catch {
    // The capture is over either way (an invalidated one throws here); the caller's error is the one to report.
  }
}

export class CudaGraph {
  readonly device: string;
  #graph: object | undefined;

  private constructor(device: string, graph: object) {
    this.device = device;
    this.#graph = graph;
  }

  /**
   * Captures the device work `fn` queues (synchronously: ops only, no awaits, no host copies) and returns
   * it with fn's result. Throws E_UNSUPPORTED on the CPU, E_CUDA when something in fn cannot be captured.
   */
  static capture<T>(device: DeviceName, fn: () => T): { graph: CudaGraph; result: T } {
    const name = deviceOrDefault(device);
    callNative(() => native().captureBegin(name));
    let result: T;
    try {
      result = fn();
    } catch (error) {
      abandonCapture(name);
      throw error;
    }
    if (result instanceof Promise) {
      abandonCapture(name);
      throw errorAtCaller('E_UNSUPPORTED', 'Expected a synchronous fn for CudaGraph.capture but it returned a Promise: queue ops only, without awaiting');
    }
    const graph = callNative(() => native().captureEnd(name));
    return { graph: new CudaGraph(name, graph), result };
  }

  /** Queues the captured work again. */
  replay(): void {
    const graph = this.#live();
    callNative(() => native().graphReplay(graph));
  }

  /** Frees the graph now; its memory goes back to the device's cache (after replays already queued). */
  dispose(): void {
    if (this.#graph) native().graphDispose(this.#graph);
    this.#graph = undefined;
  }

  [Symbol.dispose](): void {
    this.dispose();
  }

  get disposed(): boolean {
    return this.#graph === undefined;
  }

  #live(): object {
    if (!this.#graph) throw errorAtCaller('E_DISPOSED', 'Expected a live CudaGraph but received a disposed one');
    return this.#graph;
  }
}
