/**
 * Finds and loads the native binary, and types what it exports.
 *
 * node-gyp-build cannot tell a CUDA build from a CPU build by its file name, so the choice is made
 * here: the CUDA build (build/cuda/kvflash_cuda.node) when it loads and a device answers, else the
 * CPU build (build/Release/kvflash.node or a prebuild). KVFLASH_BACKEND=cpu|cuda forces a choice.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

import { KvflashError } from './errors';

/** Opaque native tensor handle; only lib/ touches it. */
export interface TensorHandle {
  dispose(): void;
  isDisposed(): boolean;
}

/** Opaque native page-table handle (see ops/page-table.ts). */
export interface PageTableNativeHandle {
  readonly batch: number;
  readonly maxPages: number;
  readonly rowsPerSequence: number;
  /** Page entries (indices) in the table. */
  readonly entries: number;
  dispose(): void;
}

export interface MemoryStats {
  /** Bytes of blocks handed out to live tensors. */
  inUse: number;
  /** Bytes of freed blocks kept for reuse (see emptyCache). */
  cached: number;
  /** High-water mark of inUse. */
  peak: number;
  /** Cap on inUse + cached in bytes; 0 when none. */
  limit: number;
  allocations: number;
  cacheHits: number;
}

interface BuildInfo {
  cuda: boolean;
  deviceCount: number;
  reason: string;
  devices: { name: string; computeCapability: string }[];
}

export interface NativeBinding {
  TensorHandle: Function;
  empty(shape: readonly number[], dtype: string, device: string): TensorHandle;
  fromHost(data: ArrayBufferView, sourceDtype: string, shape: readonly number[], dtype: string, device: string): TensorHandle;
  fill(t: TensorHandle, value: number): void;
  cast(t: TensorHandle, dtype: string): TensorHandle;
  to(t: TensorHandle, device: string): TensorHandle;
  copyInto(source: TensorHandle, target: TensorHandle): void;
  slice(t: TensorHandle, start: number, end: number): TensorHandle;
  reshape(t: TensorHandle, shape: readonly number[]): TensorHandle;
  reinterpret(t: TensorHandle, dtype: string, shape: readonly number[]): TensorHandle;
  read(t: TensorHandle, asFloat: boolean): Promise<ArrayBuffer>;
  prefill(q: TensorHandle, k: TensorHandle, v: TensorHandle, cuSeqlensQ: Int32Array, cuSeqlensK: Int32Array,
    causal: boolean, windowLeft: number, scale: number, returnLse: boolean): [TensorHandle, TensorHandle | undefined];
  pageTableArrays(table: PageTableNativeHandle): [TensorHandle, TensorHandle, TensorHandle];
  stagePageTable(indptr: Int32Array, indices: Int32Array, lastPageLen: Int32Array, device: string): PageTableNativeHandle;
  copySegments(src: Int32Array, starts: Int32Array, dst: Int32Array, offsets: Int32Array): void;
  pagedPrefill(q: TensorHandle, kPages: TensorHandle, vPages: TensorHandle, table: PageTableNativeHandle, cuSeqlensQ: Int32Array,
    causal: boolean, windowLeft: number, scale: number, returnLse: boolean): [TensorHandle, TensorHandle | undefined];
  pagedDecode(q: TensorHandle, kPages: TensorHandle, vPages: TensorHandle, table: PageTableNativeHandle, scale: number,
    returnLse: boolean, splits: number): [TensorHandle, TensorHandle | undefined];
  attentionMass(q: TensorHandle, kPages: TensorHandle, table: PageTableNativeHandle, lse: TensorHandle, cuSeqlensQ: Int32Array,
    causal: boolean, scale: number, perPage: boolean): [TensorHandle, number];
  appendPagedKV(k: TensorHandle, v: TensorHandle, kPages: TensorHandle, vPages: TensorHandle, table: PageTableNativeHandle,
    batchIndices: Int32Array, positions: Int32Array, questMeta: TensorHandle | undefined): void;
  buildQuestMeta(kPages: TensorHandle, meta: TensorHandle, table: PageTableNativeHandle): void;
  questScores(q: TensorHandle, kPages: TensorHandle | null, meta: TensorHandle, table: PageTableNativeHandle): TensorHandle;
  topkPages(scores: TensorHandle, table: PageTableNativeHandle, budgetPages: number): PageTableNativeHandle;
  questDecode(q: TensorHandle, kPages: TensorHandle, vPages: TensorHandle, table: PageTableNativeHandle, meta: TensorHandle,
    budgetPages: number, scale: number, returnLse: boolean, splits: number): [TensorHandle, TensorHandle | undefined];
  quantizePages(kSrc: TensorHandle, vSrc: TensorHandle, srcPages: Int32Array, dstPages: Int32Array, format: string, groupSize: number,
    kCodes: TensorHandle, vCodes: TensorHandle, kScale: TensorHandle, kMin: TensorHandle | undefined, vScale: TensorHandle,
    vMin: TensorHandle | undefined, questMeta: TensorHandle | undefined): void;
  dequantizePages(format: string, groupSize: number, kCodes: TensorHandle, vCodes: TensorHandle, kScale: TensorHandle,
    kMin: TensorHandle | undefined, vScale: TensorHandle, vMin: TensorHandle | undefined, pages: Int32Array, dtype: string): [TensorHandle, TensorHandle];
  quantizedPagedDecode(q: TensorHandle, format: string, groupSize: number, kCodes: TensorHandle, vCodes: TensorHandle, kScale: TensorHandle,
    kMin: TensorHandle | undefined, vScale: TensorHandle, vMin: TensorHandle | undefined, kTail: TensorHandle, vTail: TensorHandle,
    table: PageTableNativeHandle, scale: number, returnLse: boolean): [TensorHandle, TensorHandle | undefined];
  quantizedPagedPrefill(q: TensorHandle, format: string, groupSize: number, kCodes: TensorHandle, vCodes: TensorHandle, kScale: TensorHandle,
    kMin: TensorHandle | undefined, vScale: TensorHandle, vMin: TensorHandle | undefined, kTail: TensorHandle, vTail: TensorHandle,
    table: PageTableNativeHandle, cuSeqlensQ: Int32Array, causal: boolean, windowLeft: number, scale: number,
    returnLse: boolean): [TensorHandle, TensorHandle | undefined];
  buildInfo(): BuildInfo;
  memoryStats(device: string): MemoryStats;
  emptyCache(device: string): void;
  setMemoryLimit(device: string, bytes: number): void;
  synchronize(device: string): Promise<void>;
  busyWait(device: string, ms: number): void;
  flushCache(device: string): void;
  recordEvent(device: string): object;
  elapsedMs(start: object, end: object): Promise<number>;
  captureBegin(device: string): void;
  captureEnd(device: string): object;
  graphReplay(graph: object): void;
  graphDispose(graph: object): void;
}

export interface BackendInfo {
  name: 'cuda' | 'cpu';
  /** The GPU's name, on the CUDA backend. */
  device?: string;
  /** e.g. '9.0', on the CUDA backend. */
  computeCapability?: string;
  /** Why this backend was chosen. */
  reason: string;
  /** Path of the loaded binary. */
  path: string;
}

function packageRoot(): string {
  let dir = __dirname;
  for (;;) {
    const manifest = path.join(dir, 'package.json');
    if (fs.existsSync(manifest) && JSON.parse(fs.readFileSync(manifest, 'utf8')).name === 'kvflash') return dir;
    const parent = path.dirname(dir);
    if (parent === dir) throw new KvflashError('E_UNSUPPORTED', `kvflash could not find its package root above ${__dirname}`);
    dir = parent;
  }
}

let loaded: { binding: NativeBinding; info: BackendInfo } | undefined;

function load(): { binding: NativeBinding; info: BackendInfo } {
  const root = packageRoot();
  const forced = process.env.KVFLASH_BACKEND;
  if (forced !== undefined && forced !== 'cpu' && forced !== 'cuda') {
    throw new KvflashError('E_UNSUPPORTED', `Expected 'cpu' or 'cuda' for KVFLASH_BACKEND but received '${forced}'`);
  }
  let why: string;
  const cudaPath = path.join(root, 'build', 'cuda', 'kvflash_cuda.node');
  if (forced === 'cpu') {
    why = 'KVFLASH_BACKEND=cpu';
  } else if (!fs.existsSync(cudaPath)) {
    why = 'no CUDA build (nvcc was not found when kvflash was installed)';
  } else {
    try {
      const binding = require(cudaPath) as NativeBinding;
      const build = binding.buildInfo();
      if (build.deviceCount > 0) {
        const gpu = build.devices[0]!;
        return {
          binding,
          info: {
            name: 'cuda',
            device: gpu.name,
            computeCapability: gpu.computeCapability,
            reason: `CUDA build loaded and ${build.deviceCount} device(s) answered; using ${gpu.name} (sm ${gpu.computeCapability})`,
            path: cudaPath,
          },
        };
      }
      why = `CUDA build loaded but no device answered: ${build.reason}`;
    } catch (error) {
      why = `CUDA build failed to load: ${(error as Error).message.split('\n')[0]}`;
    }
  }
  if (forced === 'cuda') throw new KvflashError('E_DEVICE', `KVFLASH_BACKEND=cuda but ${why}`);
  // node-gyp-build finds build/Release/kvflash.node or a prebuild for this platform.
  const nodeGypBuild = require('node-gyp-build') as { path(dir: string): string };
  let cpuPath: string;
  try {
    cpuPath = nodeGypBuild.path(root);
  } catch (error) {
    throw new KvflashError('E_UNSUPPORTED', `kvflash has no native binary for this platform (${why}); run npm install to build one. ${(error as Error).message}`);
  }
  return {
    binding: require(cpuPath) as NativeBinding,
    info: { name: 'cpu', reason: `CPU build: ${why}`, path: cpuPath },
  };
}

/** The loaded binding (loaded on first use, so importing kvflash never fails). */
export function native(): NativeBinding {
  loaded ??= load();
  return loaded.binding;
}

/** Which backend kvflash chose and why. */
export function backend(): BackendInfo {
  loaded ??= load();
  return { ...loaded.info };
}
