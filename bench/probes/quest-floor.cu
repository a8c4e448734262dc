// The speed of light for Quest's decode step at B=1 (BENCH.md's Quest shapes): the bytes any exact
// Quest step must move, in the order it must move them, with no arithmetic at all, timed the way
// bench/quest.js times questDecodeAttention, beside the full paged decode (the kvflash kernel,
// linked from native/cuda/decode.cu) over the same cache, with the addon's own timing kernels
// (native/cuda/elementwise.cu).
//
// An exact top-k needs every page's bound before any page can be chosen, so a step reads the
// metadata (min and max keys of every page: 1/16 of the K/V bytes), all its blocks meet, and only
// then it reads the chosen pages' K and V. The probe kernel does exactly that and nothing else:
//   metadata  every block copies its share of the metadata into shared memory (one bulk copy a
//             page, all in flight at once);
//   meet      the blocks count in on one counter in global memory and wait for all;
//   gather    each (KV head, split) block copies the K and V rows of its share of the chosen pages
//             (budget / 16 pages a KV head, spread over the sequence; scattered like any table's).
// "chain" is all three in one launch, "chain per KV head" meets per KV head over that head's
// metadata rows only (the fused kernel's shape), "chain, 8-bit metadata" reads half the metadata
// bytes (what an 8-bit min/max format, rounded outward, would store). Each phase alone is timed too.
//
// Build and run from the repository root (prints one JSON object):
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Inative -Inative/cuda \
//     bench/probes/quest-floor.cu native/cuda/decode.cu native/cuda/elementwise.cu -o build/quest-floor &&
//   build/quest-floor
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "core/attention_params.h"
#include "core/errors.h"
#include "cuda/decode.h"
#include "cuda/elementwise.h"
#include "cuda/hopper.cuh"

namespace kvflash::cuda {
// What the addon's cuda_backend.cu defines for the kernels' launch checks.
void check(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return;
  cudaGetLastError();
  fail(ErrorCode::Cuda, "CUDA error in ", what, ": ", cudaGetErrorString(status));
}
void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }
}  // namespace kvflash::cuda

namespace {
using namespace kvflash;
using namespace kvflash::cuda::sm90;
#define CK(x) kvflash::cuda::check((x), #x)

constexpr int kHeads = 32, kKvHeads = 8, kHeadDim = 128, kPageSize = 16;  // bench/shapes.json
constexpr int kBlocks = 128;   // the fused kernel's grid at B=1: 16 splits x 8 KV heads
constexpr int kThreads = 256;
constexpr int kBatchBytes = 64 * 1024;  // metadata in flight a block before it waits

struct ProbeArgs {
  const int32_t* indices;  // the sequence's pages
  int pages, budget;       // budget: chosen pages a KV head
  const char* meta;        // [pages][2][Hkv][D] bf16
  const char* k;
  const char* v;
  unsigned* counters;      // [1 + Hkv], only ever counting up
  unsigned launch;         // this launch's number: the meet waits for launch x members
  int meta_row;            // bytes of one lo or hi row of one KV head: 2D (bf16) or D (an 8-bit format)
  int metadata, per_head, meet, gather;
};

__device__ __forceinline__ uint32_t smem(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
}

__global__ void __launch_bounds__(kThreads) probe_kernel(const ProbeArgs a) {
  extern __shared__ __align__(128) char sm[];
  __shared__ __align__(8) uint64_t bar_storage;
  constexpr int kRow = kHeadDim * 2;        // one KV head's row of one token, or one of a page's lo/hi rows
  constexpr int kSplits = kBlocks / kKvHeads;
  const int tid = threadIdx.x, h = blockIdx.x / kSplits, s = blockIdx.x % kSplits;
  int32_t* gather_ids = reinterpret_cast<int32_t*>(sm + kBatchBytes);
  int32_t* meta_ids = gather_ids + 1024;
  const uint32_t bar = smem(&bar_storage);
  uint32_t phase = 0;
  if (tid == 0) {
    mbar_init(bar, 1);
    mbar_init_fence();
  }
  // The block's page ids, staged once (the fused kernel holds them in shared memory too).
  const int r0 = s * a.budget / kSplits, r1 = (s + 1) * a.budget / kSplits;
  for (int r = r0 + tid; r < r1; r += kThreads) gather_ids[r - r0] = a.indices[int64_t(r) * a.pages / a.budget];
  const int parts = a.per_head ? kSplits : kBlocks, part = a.per_head ? s : blockIdx.x;
  const int p0 = int(int64_t(part) * a.pages / parts), p1 = int(int64_t(part + 1) * a.pages / parts);
  if (a.metadata)
    for (int p = p0 + tid; p < p1; p += kThreads) meta_ids[p - p0] = a.indices[p];
  __syncthreads();

  if (a.metadata) {
    // Whole pages (all KV heads' lo and hi rows, contiguous), or KV head h's lo and hi rows.
    const int piece = a.per_head ? a.meta_row : 2 * kKvHeads * a.meta_row, per_page = a.per_head ? 2 : 1;
    const int per_batch = kBatchBytes / (piece * per_page);
    for (int q0 = 0; q0 < p1 - p0; q0 += per_batch) {
      const int n = min(p1 - p0 - q0, per_batch);
      if (tid == 0) mbar_arrive_expect_tx(bar, n * per_page * piece);
      __syncthreads();
      for (int j = tid; j < n * per_page; j += kThreads) {
        const int64_t page = meta_ids[q0 + j / per_page];
        const char* src =
            a.per_head ? a.meta + ((page * 2 + j % per_page) * kKvHeads + h) * a.meta_row : a.meta + page * piece;
        bulk_copy(smem(sm + j * piece), src, piece, bar);
      }
      mbar_wait(bar, phase);
      phase ^= 1;
      __syncthreads();
    }
  }
  if (a.meet) {
    if (tid == 0) {
      unsigned* counter = a.counters + (a.per_head ? 1 + h : 0);
      const unsigned members = a.per_head ? kSplits : kBlocks;
      asm volatile("red.release.gpu.global.add.u32 [%0], 1;\n" ::"l"(counter) : "memory");
      unsigned seen;
      do {
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(seen) : "l"(counter) : "memory");
      } while (seen < a.launch * members);
    }
    __syncthreads();
  }
  if (a.gather) {
    // 16 K rows, then 16 V rows, of each of the block's pages (KV head h).
    const int n = r1 - r0;
    if (tid == 0) mbar_arrive_expect_tx(bar, n * 32 * kRow);
    __syncthreads();
    for (int j = tid; j < n * 32; j += kThreads) {
      const int64_t page = gather_ids[j / 32];
      const int t = j % 16;
      const char* pool = (j / 16) % 2 ? a.v : a.k;
      bulk_copy(smem(sm + (j * kRow) % kBatchBytes), pool + ((page * kPageSize + t) * kKvHeads + h) * kRow, kRow, bar);
    }
    mbar_wait(bar, phase);
  }
}

__global__ void fill_kernel(__nv_bfloat16* dst, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const uint32_t x = uint32_t(i) * 2654435761u ^ seed;
    dst[i] = __float2bfloat16(float(x >> 8) / 8388608.f - 1.f);
  }
}

__global__ void empty_kernel() {}

struct Buffer {
  void* p = nullptr;
  explicit Buffer(size_t bytes) { CK(cudaMalloc(&p, bytes)); }
  ~Buffer() { cudaFree(p); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  template <typename T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

// bench/timing.js's method: CUDA events around the op, a busy kernel queued first, the L2 flushed by
// reads before each run, 5 warm-up runs, the median of 30.
double time_us(cudaStream_t stream, const Buffer& flush, size_t flush_bytes, const std::function<void()>& op) {
  cudaEvent_t start, end;
  CK(cudaEventCreate(&start));
  CK(cudaEventCreate(&end));
  for (int i = 0; i < 5; ++i) op();
  std::vector<float> ms;
  for (int i = 0; i < 30; ++i) {
    cuda::launch_read_through(flush.p, flush_bytes, stream);
    cuda::launch_busy_wait(0.1, stream);
    CK(cudaEventRecord(start, stream));
    op();
    CK(cudaEventRecord(end, stream));
    CK(cudaEventSynchronize(end));
    float t = 0.f;
    CK(cudaEventElapsedTime(&t, start, end));
    ms.push_back(t);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(end);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2] * 1e3;
}

}  // namespace

int main() {
  try {
    cudaStream_t stream;
    CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    cudaDeviceProp prop{};
    CK(cudaGetDeviceProperties(&prop, 0));
    const size_t flush_bytes = size_t(prop.l2CacheSize) * 4;
    Buffer flush(flush_bytes), counters(64 * sizeof(unsigned));
    CK(cudaMemset(flush.p, 1, flush_bytes));
    CK(cudaMemset(counters.p, 0, 64 * sizeof(unsigned)));
    const size_t probe_smem = kBatchBytes + 2048 * sizeof(int32_t);
    CK(cudaFuncSetAttribute(probe_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(probe_smem)));
    const double events_us = time_us(stream, flush, flush_bytes, [] {});
    const double empty_us = time_us(stream, flush, flush_bytes, [&] { empty_kernel<<<1, 32, 0, stream>>>(); });
    std::string results;
    for (const int length : {32768, 131072}) {
      const int pages = length / kPageSize;
      std::vector<int32_t> order(pages);
      std::iota(order.begin(), order.end(), 0);
      std::shuffle(order.begin(), order.end(), std::mt19937(11));
      const size_t pool = size_t(pages) * kPageSize * kKvHeads * kHeadDim;
      Buffer k(pool * 2), v(pool * 2), meta(size_t(pages) * 2 * kKvHeads * kHeadDim * 2), q(kHeads * kHeadDim * 2),
          out(kHeads * kHeadDim * 2), lse(kHeads * 4), indices(pages * 4), indptr(8), last(4), workspace(64 << 20);
      fill_kernel<<<1024, 256>>>(k.as<__nv_bfloat16>(), pool, 1);
      fill_kernel<<<1024, 256>>>(v.as<__nv_bfloat16>(), pool, 2);
      fill_kernel<<<1024, 256>>>(meta.as<__nv_bfloat16>(), size_t(pages) * 2 * kKvHeads * kHeadDim, 3);
      fill_kernel<<<64, 256>>>(q.as<__nv_bfloat16>(), kHeads * kHeadDim, 4);
      const std::vector<int32_t> indptr_host = {0, pages}, last_host = {kPageSize};
      CK(cudaMemcpy(indices.p, order.data(), pages * 4, cudaMemcpyHostToDevice));
      CK(cudaMemcpy(indptr.p, indptr_host.data(), 8, cudaMemcpyHostToDevice));
      CK(cudaMemcpy(last.p, last_host.data(), 4, cudaMemcpyHostToDevice));

      DecodeParams full{};
      full.dtype = DType::BF16;
      full.shape = {kHeads, kKvHeads, kHeadDim};
      full.scale = 1.f / std::sqrt(float(kHeadDim));
      full.batch = 1;
      full.max_pages_per_seq = pages;
      full.q = q.p;
      full.out = out.p;
      full.lse = lse.as<float>();
      full.kv.k_pages = k.p;
      full.kv.v_pages = v.p;
      full.kv.num_pages = pages;
      full.kv.page_size = kPageSize;
      full.kv.indptr = indptr.as<int32_t>();
      full.kv.indices = indices.as<int32_t>();
      full.kv.last_page_len = last.as<int32_t>();
      full.kv.indptr_host = indptr_host.data();
      full.kv.indices_host = order.data();
      full.kv.last_page_len_host = last_host.data();
      KV_CHECK(cuda::paged_decode_workspace_bytes(full) <= (64u << 20), Range, "probe workspace too small");
      const double full_us =
          time_us(stream, flush, flush_bytes, [&] { cuda::launch_paged_decode(full, workspace.p, stream); });

      for (const int budget_tokens : {1024, 2048, 4096}) {
        unsigned launch = 0;
        auto probe = [&](int metadata, int per_head, int meet, int gather, int meta_row = 2 * kHeadDim) {
          CK(cudaMemset(counters.p, 0, 64 * sizeof(unsigned)));
          launch = 0;
          return time_us(stream, flush, flush_bytes, [&] {
            const ProbeArgs a{indices.as<int32_t>(), pages, budget_tokens / kPageSize, meta.as<char>(), k.as<char>(),
                              v.as<char>(), counters.as<unsigned>(), ++launch, meta_row, metadata, per_head, meet,
                              gather};
            probe_kernel<<<kBlocks, kThreads, probe_smem, stream>>>(a);
            CK(cudaGetLastError());
          });
        };
        const double metadata = probe(1, 0, 0, 0), meet = probe(0, 0, 1, 0), gather = probe(0, 0, 0, 1);
        const double chain = probe(1, 0, 1, 1), chain_per_head = probe(1, 1, 1, 1);
        const double chain_8bit = probe(1, 0, 1, 1, kHeadDim);
        char row[640];
        snprintf(row, sizeof row,
                 "%s{\"length\":%d,\"budgetTokens\":%d,\"fullUs\":%.2f,\"chainUs\":%.2f,\"chainPerKvHeadUs\":%.2f,"
                 "\"ceilingSpeedup\":%.2f,\"chain8bitMetadataUs\":%.2f,\"ceilingSpeedup8bitMetadata\":%.2f,"
                 "\"aloneUs\":{\"metadata\":%.2f,\"meet\":%.2f,\"gather\":%.2f}}",
                 results.empty() ? "" : ",", length, budget_tokens, full_us, chain, chain_per_head,
                 full_us / std::min(chain, chain_per_head), chain_8bit, full_us / chain_8bit, metadata, meet, gather);
        results += row;
      }
    }
    printf("{\"device\":\"%s\",\"eventsOnlyUs\":%.2f,\"emptyKernelUs\":%.2f,\"results\":[%s]}\n", prop.name, events_us,
           empty_us, results.c_str());
  } catch (const std::exception& e) {
    fprintf(stderr, "quest-floor: %s\n", e.what());
    return 1;
  }
  return 0;
}
