/** Device-wide controls: memory statistics, the allocator cache, synchronization. */
import { awaitNative, callNative } from './errors';
import { backend, MemoryStats, native } from './native';
import type { DeviceName } from './tensor';

/** @internal The device name ops use for `device` (default: the backend's device). */
export function deviceOrDefault(device: DeviceName | undefined): string {
  if (device === undefined) return backend().name === 'cuda' ? 'cuda:0' : 'cpu';
  return device === 'cuda' ? 'cuda:0' : device;
}

/** Memory statistics of a device's caching allocator (default: the backend's device). */
export function memory(device?: DeviceName): MemoryStats {
  const name = deviceOrDefault(device);
  return callNative(() => native().memoryStats(name));
}

/** Returns the allocator's cached (freed but kept) blocks to the device. */
export function emptyCache(device?: DeviceName): void {
  const name = deviceOrDefault(device);
  callNative(() => native().emptyCache(name));
}

/**
 * Caps the bytes a device's allocator may hold (in use plus cached); 0 removes the cap. Allocations
 * beyond it fail with E_OOM, as they would on a full device.
 */
export function setMemoryLimit(device: DeviceName, bytes: number): void {
  const name = deviceOrDefault(device);
  callNative(() => native().setMemoryLimit(name, bytes));
}

/** Resolves once all work queued so far on the device has finished. Never blocks the event loop. */
export async function synchronize(device?: DeviceName): Promise<void> {
  const name = deviceOrDefault(device);
  await awaitNative(callNative(() => native().synchronize(name)));
}

/** A point in a device's queue of work, for timing GPU work without host overhead in the number. */
export class TimingEvent {
  #event: object;
  readonly device: string;

  /** Marks the point after all work queued so far on `device`. */
  constructor(device?: DeviceName) {
    this.device = deviceOrDefault(device);
    this.#event = callNative(() => native().recordEvent(this.device));
  }

  /** Milliseconds of device time from `start` to this event; resolves once the device gets here. */
  async elapsedSince(start: TimingEvent): Promise<number> {
    const from = start.#event;
    return awaitNative(callNative(() => native().elapsedMs(from, this.#event)));
  }
}

/** Test support: queues about `ms` milliseconds of busy work on a GPU's stream. */
export function gpuBusyWait(ms: number, device?: DeviceName): void {
  const name = deviceOrDefault(device);
  callNative(() => native().busyWait(name, ms));
}

/**
 * Benchmark support: evicts a GPU's L2 cache by reading a buffer four times its size (reads only, so
 * no dirty lines are left whose write-back would land in the next op's time).
 */
export function flushL2Cache(device?: DeviceName): void {
  const name = deviceOrDefault(device);
  callNative(() => native().flushCache(name));
}
