/** kvflash: the public API. */
export { KvflashError } from './errors';
export type { ErrorCode } from './errors';
export { DTYPES, dtypeBytes } from './dtype';
export type { DType, HostArray } from './dtype';
export { backend } from './native';
export type { BackendInfo, MemoryStats } from './native';
export { Tensor } from './tensor';
export type { ArrayData, DeviceName, TensorOptions } from './tensor';
export { emptyCache, flushL2Cache, gpuBusyWait, memory, setMemoryLimit, synchronize, TimingEvent } from './runtime';
export { CudaGraph } from './graph';
export * as ops from './ops/index';
export type { AppendPositions, AttentionMassOptions, AttentionResult, DecodeOptions, KVPages, MaskOptions, PagedPrefillOptions, PrefillOptions } from './ops/attention';
export type { PageTable } from './ops/page-table';
export type { QuantFormat, QuantizedKVPages, QuantizedLayerOptions, QuantizePagesArgs, TailPages } from './ops/quant';
export { BlockAllocator, CacheStep, H2O, PagedKVCache, PrefixCache, SnapKV, StreamingLLM } from './cache/index';
export type {
  AddSequenceOptions,
  AllocatorStats,
  CacheStats,
  Compression,
  CompressResult,
  EvictionPolicy,
  H2OOptions,
  ObservationScores,
  PagedKVCacheOptions,
  PageTableOptions,
  PrefixCacheStats,
  QuantizedCacheOptions,
  SequenceInfo,
  SequenceView,
  SnapKVOptions,
  StepEntry,
  StreamingLLMOptions,
} from './cache/index';
