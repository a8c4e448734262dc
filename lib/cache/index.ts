/** The KV-cache managers: page allocation, paged caches with copy-on-write, prefix reuse, eviction policies. */
export { BlockAllocator } from './block-allocator';
export type { AllocatorStats } from './block-allocator';
export { CacheStep } from './cache-step';
export { PagedKVCache } from './paged-kv-cache';
export type { AddSequenceOptions, CacheStats, CompressResult, PagedKVCacheOptions, PageTableOptions, SequenceInfo, StepEntry } from './paged-kv-cache';
export type { QuantizedCacheOptions } from './quant-options';
export { PrefixCache } from './prefix-cache';
export type { PrefixCacheStats } from './prefix-cache';
export { H2O } from './policies/h2o';
export type { H2OOptions } from './policies/h2o';
export { SnapKV } from './policies/snapkv';
export type { SnapKVOptions } from './policies/snapkv';
export { StreamingLLM } from './policies/streaming-llm';
export type { StreamingLLMOptions } from './policies/streaming-llm';
export type { Compression, EvictionPolicy, ObservationScores, SequenceView } from './policies/policy';
