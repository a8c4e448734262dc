#include <algorithm>
#include <type_traits>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "quest.h"
#include "scalar.cuh"

namespace kvflash::cuda {
namespace {

// One block per page to update; threads stride over the (head, channel) pairs of a token. The min
// and max of stored values are stored values, so converting back is exact.
// T: the page dtype (__nv_bfloat16 or __half).
template <typename T>
__global__ void quest_meta_kernel(const QuestMetaParams p) {
  const int64_t row = int64_t(p.num_kv_heads) * p.head_dim;
  const int64_t page = p.pages[blockIdx.x];
  const int valid = p.valid_len[blockIdx.x];
  const T* keys = static_cast<const T*>(p.k_pages) + page * p.page_size * row;
  T* meta = static_cast<T*>(p.meta) + page * 2 * row;
  for (int64_t c = threadIdx.x; c < row; c += blockDim.x) {
    float lo = to_float(keys[c]), hi = lo;
    for (int slot = 1; slot < valid; ++slot) {
      const float k = to_float(keys[slot * row + c]);
      lo = fminf(lo, k);
      hi = fmaxf(hi, k);
    }
    meta[c] = from_float<T>(lo);
    meta[row + c] = from_float<T>(hi);
  }
}

constexpr int kScoreWarps = 8;

// N consecutive elements (N * 2 bytes, aligned to that) in one vector load, as floats.
template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* src, float (&out)[N]) {
  using Vec = std::conditional_t<N == 2, uint32_t, std::conditional_t<N == 4, uint2, uint4>>;
  const Vec v = *reinterpret_cast<const Vec*>(src);
  const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(e[i]);
}

// One warp per (page entry, KV head): each lane holds D/32 consecutive channels of the page's min
// and max (one vector load each), the warp sums, and the bound is maximised over the group's heads.
// T: the q / meta dtype. D: head dim (64, 128 or 256).
template <typename T, int D>
__global__ void __launch_bounds__(kScoreWarps * 32) quest_scores_kernel(const QuestScoreParams p) {
  constexpr int N = D / 32;
  const int lane = threadIdx.x % 32;
  const int64_t item = int64_t(blockIdx.x) * kScoreWarps + threadIdx.x / 32;
  const int kv_heads = p.shape.num_kv_heads;
  if (item >= int64_t(p.nnz) * kv_heads) return;
  const int entry = static_cast<int>(item / kv_heads), h = static_cast<int>(item % kv_heads);
  int b = 0, hi_b = p.batch - 1;  // the sequence owning `entry`: indptr[b] <= entry < indptr[b+1]
  while (b < hi_b) {
    const int mid = (b + hi_b + 1) / 2;
    if (p.kv.indptr[mid] <= entry) b = mid; else hi_b = mid - 1;
  }
  const int64_t page = p.kv.indices[entry];
  const T* mins = static_cast<const T*>(p.meta) + (page * 2 * kv_heads + h) * D + lane * N;
  float lo[N], hi[N];
  load_floats(mins, lo);
  load_floats(mins + int64_t(kv_heads) * D, hi);
  const int group = p.shape.num_q_heads / kv_heads;
  const T* q = static_cast<const T*>(p.q) + (int64_t(b) * p.shape.num_q_heads + h * group) * D + lane * N;
  float best = -INFINITY;
  for (int g = 0; g < group; ++g, q += D) {
    float qv[N];
    load_floats(q, qv);
    float bound = 0.0f;
#pragma unroll
    for (int i = 0; i < N; ++i) bound += fmaxf(qv[i] * lo[i], qv[i] * hi[i]);
    best = fmaxf(best, warp_sum(bound));
  }
  if (lane == 0) p.scores[item] = best;
}

constexpr int kTopkThreads = 1024;
// Rows of up to this many pages keep their keys in shared memory for the select's passes (44 KB, under
// the 48 KB a block gets without opting in: 180K tokens at page size 16); longer rows re-read them
// from global memory (the L2) each pass.
constexpr int kTopkSharedKeys = 11264;

// Larger float, larger key (NaN sorts above everything, deterministically).
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// In warp 0: the bin, counted from the top, where the running count of `histogram` reaches
// `remaining`, and how many keys lie in the bins above it. Each lane sums 8 bins, a warp scan
// finds the lane, and that lane walks its own 8; it alone returns true.
__device__ __forceinline__ bool find_bin(const int* histogram, int remaining, int* bin_out, int* above_out) {
  const int lane = threadIdx.x;
  int counts[8], lane_total = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) lane_total += counts[i] = histogram[255 - (lane * 8 + i)];
  int inclusive = lane_total;
  for (int offset = 1; offset < 32; offset *= 2) {
    const int up = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += up;
  }
  const int before = inclusive - lane_total;
  if (before >= remaining || inclusive < remaining) return false;
  int above = before, i = 0;
  while (above + counts[i] < remaining) above += counts[i++];
  *bin_out = 255 - (lane * 8 + i);
  *above_out = above;
  return true;
}

// One block per (sequence, KV head) row. The budget - 1 best pages before the last are found by a
// radix select of the k-th largest key (4 passes of 8 bits), then written in page order by a block
// scan; among equal keys the earlier page wins. The last page closes the row.
__global__ void __launch_bounds__(kTopkThreads) topk_pages_kernel(const TopkPagesParams p) {
  using Scan = cub::BlockScan<int, kTopkThreads>;
  using Reduce = cub::BlockReduce<int, kTopkThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ typename Reduce::TempStorage reduce_storage;
  __shared__ int histogram[256];
  __shared__ int32_t shared_offset;
  __shared__ uint32_t shared_prefix;
  __shared__ int shared_remaining;
  extern __shared__ uint32_t shared_keys[];

  const int b = blockIdx.x / p.num_kv_heads, h = blockIdx.x % p.num_kv_heads;
  const int32_t begin = p.kv.indptr[b];
  const int n = p.kv.indptr[b + 1] - begin;
  // The row's place in the selection: every earlier row holds min(its pages, budget) entries.
  int before = 0;
  for (int i = threadIdx.x; i < b; i += blockDim.x) before += min(p.kv.indptr[i + 1] - p.kv.indptr[i], p.budget);
  before = Reduce(reduce_storage).Sum(before);  // valid in thread 0
  if (threadIdx.x == 0) {
    shared_offset = before * p.num_kv_heads + h * min(n, p.budget);
    p.out_indptr[blockIdx.x + 1] = shared_offset + min(n, p.budget);
    p.out_last_page_len[blockIdx.x] = p.kv.last_page_len[b];
    if (blockIdx.x == 0) p.out_indptr[0] = 0;
  }
  __syncthreads();
  int32_t* out = p.out_indices + shared_offset;
  if (n <= p.budget) {
    for (int j = threadIdx.x; j < n; j += blockDim.x) out[j] = p.kv.indices[begin + j];
    return;
  }
  const int candidates = n - 1;
  const int k = p.budget - 1;
  // Decided by the longest row, as the launch sized the shared memory by it.
  const bool keys_shared = p.max_pages - 1 <= kTopkSharedKeys;
  auto global_key = [&](int j) { return order_key(p.scores[int64_t(begin + j) * p.num_kv_heads + h]); };
  if (keys_shared) {
    for (int j = threadIdx.x; j < candidates; j += blockDim.x) shared_keys[j] = global_key(j);
  }
  auto key_of = [&](int j) { return keys_shared ? shared_keys[j] : global_key(j); };

  uint32_t prefix = 0, mask = 0;
  int remaining = k;
  for (int shift = 24; shift >= 0 && k > 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) histogram[i] = 0;
    __syncthreads();
    for (int j = threadIdx.x; j < candidates; j += blockDim.x) {
      const uint32_t key = key_of(j);
      if ((key & mask) == prefix) atomicAdd(&histogram[(key >> shift) & 255u], 1);
    }
    __syncthreads();
    int bin, above;
    if (threadIdx.x < 32 && find_bin(histogram, remaining, &bin, &above)) {
      shared_prefix = prefix | (uint32_t(bin) << shift);
      shared_remaining = remaining - above;
    }
    __syncthreads();
    prefix = shared_prefix;
    remaining = shared_remaining;
    mask |= 255u << shift;
    __syncthreads();
  }
  // prefix is now the k-th largest key; `remaining` of the pages equal to it are taken.
  int ties_before = 0, written = 0;
  for (int base = 0; base < candidates && k > 0; base += blockDim.x) {
    const int j = base + threadIdx.x;
    const uint32_t key = j < candidates ? key_of(j) : 0u;
    const int tie = j < candidates && key == prefix;
    int tie_rank, tie_total;
    Scan(scan_storage).ExclusiveSum(tie, tie_rank, tie_total);
    __syncthreads();
    const int take = j < candidates && (key > prefix || (tie && ties_before + tie_rank < remaining));
    int slot, taken;
    Scan(scan_storage).ExclusiveSum(take, slot, taken);
    __syncthreads();
    if (take) out[written + slot] = p.kv.indices[begin + j];
    ties_before += tie_total;
    written += taken;
  }
  if (threadIdx.x == 0) out[k] = p.kv.indices[begin + n - 1];
}

}  // namespace

void launch_quest_update_meta(const QuestMetaParams& p, cudaStream_t stream) {
  dispatch_dtype(p.dtype, [&](auto t) {
    quest_meta_kernel<decltype(t)><<<p.num_pages_to_update, 256, 0, stream>>>(p);
  });
  check_launch("quest_meta_kernel");
}

void launch_quest_scores(const QuestScoreParams& p, cudaStream_t stream) {
  const int64_t warps = int64_t(p.nnz) * p.shape.num_kv_heads;
  const unsigned blocks = static_cast<unsigned>((warps + kScoreWarps - 1) / kScoreWarps);
  dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    switch (p.shape.head_dim) {
      case 64: quest_scores_kernel<T, 64><<<blocks, kScoreWarps * 32, 0, stream>>>(p); break;
      case 128: quest_scores_kernel<T, 128><<<blocks, kScoreWarps * 32, 0, stream>>>(p); break;
      default: quest_scores_kernel<T, 256><<<blocks, kScoreWarps * 32, 0, stream>>>(p); break;
    }
  });
  check_launch("quest_scores_kernel");
}

void launch_topk_pages(const TopkPagesParams& p, cudaStream_t stream) {
  if (p.batch == 0) return;
  const size_t shared_keys = p.max_pages - 1 <= kTopkSharedKeys ? sizeof(uint32_t) * std::max(p.max_pages - 1, 1) : 0;
  topk_pages_kernel<<<p.batch * p.num_kv_heads, kTopkThreads, shared_keys, stream>>>(p);
  check_launch("topk_pages_kernel");
}

}  // namespace kvflash::cuda
