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

// One warp per (page entry, KV head): each lane takes every 32nd channel, the warp sums, and the
// bound is maximised over the query heads of the group.
// T: the q / meta dtype.
template <typename T>
__global__ void __launch_bounds__(kScoreWarps * 32) quest_scores_kernel(const QuestScoreParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t item = int64_t(blockIdx.x) * kScoreWarps + threadIdx.x / 32;
  const int kv_heads = p.shape.num_kv_heads, D = p.shape.head_dim;
  if (item >= int64_t(p.nnz) * kv_heads) return;
  const int entry = static_cast<int>(item / kv_heads), h = static_cast<int>(item % kv_heads);
  int lo_b = 0, hi_b = p.batch - 1;  // the sequence owning `entry`: indptr[b] <= entry < indptr[b+1]
  while (lo_b < hi_b) {
    const int mid = (lo_b + hi_b + 1) / 2;
    if (p.kv.indptr[mid] <= entry) lo_b = mid; else hi_b = mid - 1;
  }
  const int64_t page = p.kv.indices[entry];
  const T* mins = static_cast<const T*>(p.meta) + (page * 2 * kv_heads + h) * D;
  const T* maxs = mins + int64_t(kv_heads) * D;
  const int group = p.shape.num_q_heads / kv_heads;
  float best = -INFINITY;
  for (int g = 0; g < group; ++g) {
    const T* q = static_cast<const T*>(p.q) + (int64_t(lo_b) * p.shape.num_q_heads + h * group + g) * D;
    float bound = 0.0f;
    for (int c = lane; c < D; c += 32) {
      const float qc = to_float(q[c]);
      bound += fmaxf(qc * to_float(mins[c]), qc * to_float(maxs[c]));
    }
    best = fmaxf(best, warp_sum(bound));
  }
  if (lane == 0) p.scores[item] = best;
}

constexpr int kTopkThreads = 256;

// Larger float, larger key (NaN sorts above everything, deterministically).
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// One block per (sequence, KV head) row. The budget - 1 best pages before the last are found by a
// radix select of the k-th largest key (4 passes of 8 bits), then written in page order by a block
// scan; among equal keys the earlier page wins. The last page closes the row.
__global__ void __launch_bounds__(kTopkThreads) topk_pages_kernel(const TopkPagesParams p) {
  using Scan = cub::BlockScan<int, kTopkThreads>;
  using Reduce = cub::BlockReduce<int, kTopkThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ typename Reduce::TempStorage reduce_storage;
  __shared__ int32_t shared_offset;
  __shared__ int histogram[256];
  __shared__ uint32_t shared_prefix;
  __shared__ int shared_remaining;

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
  auto key_of = [&](int j) { return order_key(p.scores[int64_t(begin + j) * p.num_kv_heads + h]); };

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
    if (threadIdx.x == 0) {
      int above = 0, bin = 255;
      while (above + histogram[bin] < remaining) above += histogram[bin--];
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
    quest_scores_kernel<decltype(t)><<<blocks, kScoreWarps * 32, 0, stream>>>(p);
  });
  check_launch("quest_scores_kernel");
}

void launch_topk_pages(const TopkPagesParams& p, cudaStream_t stream) {
  if (p.batch == 0) return;
  topk_pages_kernel<<<p.batch * p.num_kv_heads, kTopkThreads, 0, stream>>>(p);
  check_launch("topk_pages_kernel");
}

}  // namespace kvflash::cuda
