// Quest on the GPU: page metadata, page scores and the per-head top-k selection.
//
// A decode step runs scores -> top-k -> sparse decode back to back on one stream, each stage a few
// microseconds, so the seams matter as much as the stages: the score and top-k kernels let the next
// kernel launch early (programmatic dependent launch), and each waits on-device for its inputs.
#include <algorithm>
#include <map>
#include <mutex>

#include "pdl.cuh"
#include "quest.h"
#include "quest_bounds.cuh"
#include "quest_select.cuh"

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
  T* meta = static_cast<T*>(p.meta) + (p.meta_pages ? int64_t(p.meta_pages[blockIdx.x]) : page) * 2 * row;
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

// One block per (KV head, slice of a sequence's entries, sequence): the slice's metadata streams
// through bound_pages (quest_bounds.cuh), which the fused Quest decode runs too.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) quest_scores_kernel(const QuestScoreParams p, int slice) {
  extern __shared__ __align__(128) unsigned char smem[];
  launch_dependents();  // the top-k grid may launch now; it waits on-device for these scores
  const int h = blockIdx.x, b = blockIdx.z;
  const int kv_heads = p.shape.num_kv_heads;
  const int32_t begin = p.kv.indptr[b] + blockIdx.y * slice;
  // A quantized layer's last page (a tail page) has no metadata: the row's first block scores it +inf.
  const int32_t end = p.kv.indptr[b + 1] - (p.last_is_tail ? 1 : 0);
  if (p.last_is_tail && blockIdx.y == 0 && threadIdx.x == 0) p.scores[int64_t(end) * kv_heads + h] = INFINITY;
  const int count = min(slice, end - begin);
  if (count <= 0) return;
  const int group = p.shape.num_q_heads / kv_heads;
  const int mtiles = (group + 15) / 16;
  T* queries = reinterpret_cast<T*>(smem);          // [mtiles * 16][2D]
  T* ring = queries + mtiles * 16 * 2 * D;          // [2][kBoundChunk][2D]
  int32_t* ids = reinterpret_cast<int32_t*>(ring + 2 * kBoundChunk<D> * 2 * D);  // [slice]
  stage_bound_queries<T, D, kWarps>(static_cast<const T*>(p.q) + (int64_t(b) * p.shape.num_q_heads + h * group) * D,
                                    group, mtiles * 16, queries);
  for (int i = threadIdx.x; i < count; i += kThreads) ids[i] = p.kv.indices[begin + i];
  __syncthreads();
  bound_pages<T, D, kWarps>(static_cast<const T*>(p.meta), kv_heads, h, ids, count, smem_addr(queries), mtiles, group,
                            ring, [&](int i, float bound) { p.scores[int64_t(begin + i) * kv_heads + h] = bound; });
}

constexpr int kTopkThreads = 512;
constexpr int kTopkWarps = kTopkThreads / 32;
// Rows of up to this many candidates stage their scores and page ids in shared memory (64 KB: 128K
// tokens at page size 16); longer rows re-read them from global memory (the L2) at each pass.
constexpr int kTopkSharedKeys = 8192;
// Candidates each thread loads per round while staging, all in flight at once.
constexpr int kTopkBatch = 8;
// In warp 0, after a pass histogrammed the digit at bit `bottom` (width `bits`) of the keys matching
// th's prefix: narrows th to the bin, counted from the top, where the running count reaches
// th.remaining. Each lane holds 8 bins in registers, a warp scan finds the lane, and that lane walks
// its 8 (unrolled: every step here is on the block's critical path).
__device__ __forceinline__ void narrow_to_bin(const int* histogram, int bottom, int bits, Threshold th,
                                              Threshold* out) {
  const int lane = threadIdx.x;
  int counts[8], lane_total = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) lane_total += counts[i] = histogram[255 - (lane * 8 + i)];
  int inclusive = lane_total;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const int up = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += up;
  }
  const int before = inclusive - lane_total;
  if (before >= th.remaining || inclusive < th.remaining) return;
  int above = before, step = 0, count = 0;
  bool found = false;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    if (!found && above + counts[i] >= th.remaining) found = true, step = i, count = counts[i];
    if (!found) above += counts[i];
  }
  const int bin = 255 - (lane * 8 + step);
  *out = {th.prefix | (uint32_t(bin) << bottom), th.mask | (((2u << (bits - 1)) - 1u) << bottom),
          th.remaining - above, count};
}

// One block per (sequence, KV head) row. The budget - 1 best pages before the last are those at or
// above the k-th largest key (among equal keys the earlier page wins), found by a radix select that
// starts at the highest bit where the row's keys differ (so the first pass already spreads them) and
// hands a small final bin to one warp, which ranks its keys exactly. One block scan then writes the
// chosen pages in page order; the last page closes the row. The block is latency-bound (a few keys
// per thread, a barrier per phase), so the short loops are unrolled and loads batched.
// STAGED: the scores and page ids of the row sit in shared memory (rows up to kTopkSharedKeys
// candidates); else every pass re-reads them from global memory (the L2).
template <bool STAGED>
__global__ void __launch_bounds__(kTopkThreads) topk_pages_kernel(const TopkPagesParams p) {
  __shared__ int histogram[2][256];
  __shared__ uint32_t warp_lo[kTopkWarps], warp_hi[kTopkWarps];
  __shared__ int2 warp_totals[kTopkWarps];
  __shared__ uint32_t member_key[kRankWarp];
  __shared__ int member_index[kRankWarp];
  __shared__ int member_count, row_offset;
  __shared__ Threshold shared_threshold;
  extern __shared__ uint32_t staged[];  // STAGED: [longest row's candidates] scores, then as many page ids

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  wait_for_previous_grid();
  launch_dependents();
  const int b = blockIdx.x / p.num_kv_heads, h = blockIdx.x % p.num_kv_heads;
  const int32_t begin = p.kv.indptr[b];
  const int n = p.kv.indptr[b + 1] - begin;
  const int k = p.budget - 1;  // pages taken besides the last one, when n > budget
  if (warp == 0) {
    // The row's place in the selection: every earlier row holds min(its pages, budget) entries.
    int before = 0;
    for (int i = lane; i < b; i += 32) before += min(p.kv.indptr[i + 1] - p.kv.indptr[i], p.budget);
    before = __reduce_add_sync(0xffffffffu, before);
    if (lane == 0) {
      const int32_t offset = before * p.num_kv_heads + h * min(n, p.budget);
      p.out_indptr[blockIdx.x + 1] = offset + min(n, p.budget);
      p.out_last_page_len[blockIdx.x] = p.kv.last_page_len[b];
      if (blockIdx.x == 0) p.out_indptr[0] = 0;
      if (n > p.budget) p.out_indices[offset + k] = p.kv.indices[begin + n - 1];
      row_offset = offset;
      member_count = 0;
    }
  }
  if (n <= p.budget) {
    __syncthreads();
    for (int j = tid; j < n; j += kTopkThreads) p.out_indices[row_offset + j] = p.kv.indices[begin + j];
    return;
  }
  if (k == 0) return;

  const int candidates = n - 1;
  float* staged_scores = reinterpret_cast<float*>(staged);
  int32_t* staged_ids = reinterpret_cast<int32_t*>(staged + max(p.max_pages - 1, 1));
  auto key_at = [&](int j) {
    return order_key(STAGED ? staged_scores[j] : p.scores[int64_t(begin + j) * p.num_kv_heads + h]);
  };
  auto id_at = [&](int j) { return STAGED ? staged_ids[j] : p.kv.indices[begin + j]; };
  uint32_t lo = ~0u, hi = 0u;
  // Loads in batches, all in flight at once; the keys' range comes with them.
  for (int base = tid; base < candidates; base += kTopkBatch * kTopkThreads) {
    float s[kTopkBatch];
    int32_t id[kTopkBatch];
#pragma unroll
    for (int i = 0; i < kTopkBatch; ++i) {
      const int j = base + i * kTopkThreads;
      if (j < candidates) {
        s[i] = p.scores[int64_t(begin + j) * p.num_kv_heads + h];
        if (STAGED) id[i] = p.kv.indices[begin + j];
      }
    }
#pragma unroll
    for (int i = 0; i < kTopkBatch; ++i) {
      const int j = base + i * kTopkThreads;
      if (j < candidates) {
        if (STAGED) staged_scores[j] = s[i], staged_ids[j] = id[i];
        lo = min(lo, order_key(s[i]));
        hi = max(hi, order_key(s[i]));
      }
    }
  }
  lo = __reduce_min_sync(0xffffffffu, lo);
  hi = __reduce_max_sync(0xffffffffu, hi);
  if (lane == 0) warp_lo[warp] = lo, warp_hi[warp] = hi;
  for (int i = tid; i < 2 * 256; i += kTopkThreads) (&histogram[0][0])[i] = 0;
  __syncthreads();
#pragma unroll
  for (int w = 0; w < kTopkWarps; ++w) lo = min(lo, warp_lo[w]), hi = max(hi, warp_hi[w]);

  // Bits above `top` are the same in every key. Each pass histograms the next (up to) 8 bits of the
  // keys still matching the prefix; passes alternate histograms so one is cleared while the other is read.
  int top = 32 - __clz(lo ^ hi);
  const uint32_t common = top == 32 ? 0u : ~0u << top;
  Threshold th{hi & common, common, k, candidates};
  for (int pass = 0; top > 0 && th.count > th.remaining; ++pass) {
    const int bottom = max(top - 8, 0);
    int* hist = histogram[pass & 1];
#pragma unroll 4
    for (int j = tid; j < candidates; j += kTopkThreads) {
      const uint32_t key = key_at(j);
      if ((key & th.mask) == th.prefix) atomicAdd(&hist[(key >> bottom) & 255u], 1);
    }
    __syncthreads();
    if (warp == 0) {
      narrow_to_bin(hist, bottom, top - bottom, th, &shared_threshold);
    } else {
      for (int i = tid - 32; i < 256; i += kTopkThreads - 32) histogram[(pass + 1) & 1][i] = 0;
    }
    __syncthreads();
    th = shared_threshold;
    top = bottom;
    if (top > 0 && th.count > th.remaining && th.count <= kRankWarp) {
      // Rank the bin's keys in one warp: the remaining-th best (key, then earlier page) sets the threshold.
#pragma unroll 4
      for (int j = tid; j < candidates; j += kTopkThreads) {
        const uint32_t key = key_at(j);
        if ((key & th.mask) == th.prefix) {
          const int slot = atomicAdd(&member_count, 1);
          member_key[slot] = key;
          member_index[slot] = j;
        }
      }
      __syncthreads();
      if (warp == 0) rank_bin_members(member_key, member_index, th, &shared_threshold);
      __syncthreads();
      th = shared_threshold;
      break;
    }
  }

  // Taken before a position: the keys above the prefix there, plus the first `remaining` equal ones.
  const int per_thread = (candidates + kTopkThreads - 1) / kTopkThreads;
  const int j0 = min(tid * per_thread, candidates), j1 = min(j0 + per_thread, candidates);
  int2 counts = make_int2(0, 0);
#pragma unroll 4
  for (int j = j0; j < j1; ++j) {
    const uint32_t masked = key_at(j) & th.mask;
    counts.x += masked > th.prefix;
    counts.y += masked == th.prefix;
  }
  const int2 start = block_exclusive_sum<kTopkWarps>(counts, warp_totals);
  int32_t* out = p.out_indices + row_offset;
  int slot = start.x + min(start.y, th.remaining), ties = start.y;
#pragma unroll 4
  for (int j = j0; j < j1; ++j) {
    const uint32_t masked = key_at(j) & th.mask;
    if (masked > th.prefix || (masked == th.prefix && ties++ < th.remaining)) out[slot++] = id_at(j);
  }
}

// Raises a kernel's dynamic shared-memory limit to at least `bytes` (per device, only ever upward),
// after checking the device allows that much.
void raise_smem_limit(const void* kernel, size_t bytes, const char* what) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, size_t> raised;
  int device = 0, limit = 0;
  KV_CUDA(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mutex);
  size_t& done = raised[{device, kernel}];
  if (bytes <= done) return;
  KV_CUDA(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  KV_CHECK(bytes <= static_cast<size_t>(limit), Unsupported, what, " needs ", bytes,
           " bytes of shared memory per block; the device has ", limit);
  KV_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  done = bytes;
}

}  // namespace

void launch_quest_update_meta(const QuestMetaParams& p, cudaStream_t stream) {
  dispatch_dtype(p.dtype, [&](auto t) {
    quest_meta_kernel<decltype(t)><<<p.num_pages_to_update, 256, 0, stream>>>(p);
  });
  check_launch("quest_meta_kernel");
}

void launch_quest_scores(const QuestScoreParams& p, cudaStream_t stream) {
  const int group = p.shape.num_q_heads / p.shape.num_kv_heads;
  const size_t queries = static_cast<size_t>((group + 15) / 16) * 16 * 2 * p.shape.head_dim * dtype_size(p.dtype);
  dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    auto launch = [&](auto kernel, int chunk) {
      // Two ring stages of pages a block: both copies in flight from the start.
      const int slice = 2 * chunk;
      const size_t smem = queries + 2 * 32768 + slice * sizeof(int32_t);
      raise_smem_limit(reinterpret_cast<const void*>(kernel), smem, "questScores");
      const dim3 grid(p.shape.num_kv_heads, (p.max_pages + slice - 1) / slice, p.batch);
      kernel<<<grid, kThreads, smem, stream>>>(p, slice);
    };
    switch (p.shape.head_dim) {
      case 64: launch(quest_scores_kernel<T, 64>, kBoundChunk<64>); break;
      case 128: launch(quest_scores_kernel<T, 128>, kBoundChunk<128>); break;
      default: launch(quest_scores_kernel<T, 256>, kBoundChunk<256>); break;
    }
  });
  check_launch("quest_scores_kernel");
}

void launch_topk_pages(const TopkPagesParams& p, cudaStream_t stream) {
  if (p.batch == 0) return;
  const unsigned blocks = static_cast<unsigned>(p.batch * p.num_kv_heads);
  if (p.max_pages - 1 <= kTopkSharedKeys) {
    const size_t smem = 2 * sizeof(uint32_t) * std::max(p.max_pages - 1, 1);
    raise_smem_limit(reinterpret_cast<const void*>(topk_pages_kernel<true>), smem, "topkPages");
    launch_programmatic(topk_pages_kernel<true>, dim3(blocks), dim3(kTopkThreads), smem, device_has_pdl(), stream, p);
  } else {
    launch_programmatic(topk_pages_kernel<false>, dim3(blocks), dim3(kTopkThreads), 0, device_has_pdl(), stream, p);
  }
  check_launch("topk_pages_kernel");
}

}  // namespace kvflash::cuda
