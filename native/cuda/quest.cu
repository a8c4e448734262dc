// Quest on the GPU: page metadata, page scores and the per-head top-k selection.
//
// A decode step runs scores -> top-k -> sparse decode back to back on one stream, each stage a few
// microseconds, so the seams matter as much as the stages: the score and top-k kernels let the next
// kernel launch early (programmatic dependent launch), and each waits on-device for its inputs.
#include <algorithm>
#include <mutex>
#include <set>

#include "pdl.cuh"
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

constexpr int kScoreThreads = 256;

// Eight consecutive elements (16 bytes, aligned) in one vector load, as floats.
template <typename T>
__device__ __forceinline__ void load8(const T* src, float (&out)[8]) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(src));
  const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = to_float(e[i]);
}

// One thread per (page entry, KV head, 8-channel chunk): the chunk's min and max in two 16-byte
// loads. The D/8 threads of an (entry, head) are adjacent lanes that sum by shuffles, so a warp reads
// whole runs of a page's metadata and every load is issued at once. The bound is maximised over the
// group's query heads, four at a time so their shuffle reductions overlap.
// T: the q / meta dtype. D: head dim (64, 128 or 256).
template <typename T, int D>
__global__ void __launch_bounds__(kScoreThreads) quest_scores_kernel(const QuestScoreParams p) {
  constexpr int CH = D / 8;  // chunks per (entry, head), a power of two dividing 32
  constexpr int G = 4;       // query heads reduced together
  launch_dependents();
  const int kv_heads = p.shape.num_kv_heads;
  const int64_t items = int64_t(p.nnz) * kv_heads * CH;
  const int64_t t = int64_t(blockIdx.x) * kScoreThreads + threadIdx.x;
  // Threads past the end repeat the last item (unstored) so every lane takes part in the shuffles.
  const int64_t item = t < items ? t : items - 1;
  const int c = static_cast<int>(item % CH);
  const int64_t pair = item / CH;  // entry * kv_heads + h: the score's index
  const int entry = static_cast<int>(pair / kv_heads), h = static_cast<int>(pair % kv_heads);
  int b = 0, hi_b = p.batch - 1;  // the sequence owning `entry`: indptr[b] <= entry < indptr[b+1]
  while (b < hi_b) {
    const int mid = (b + hi_b + 1) / 2;
    if (p.kv.indptr[mid] <= entry) b = mid; else hi_b = mid - 1;
  }
  const int64_t page = p.kv.indices[entry];
  const T* mins = static_cast<const T*>(p.meta) + (page * 2 * kv_heads + h) * D + c * 8;
  float lo[8], hi[8];
  load8(mins, lo);
  load8(mins + int64_t(kv_heads) * D, hi);
  const int group = p.shape.num_q_heads / kv_heads;
  const T* q = static_cast<const T*>(p.q) + (int64_t(b) * p.shape.num_q_heads + h * group) * D + c * 8;
  float best = -INFINITY;
  for (int g0 = 0; g0 < group; g0 += G) {
    float bound[G];
#pragma unroll
    for (int u = 0; u < G; ++u) {
      bound[u] = 0.0f;
      if (g0 + u < group) {
        float qv[8];
        load8(q + (g0 + u) * D, qv);
#pragma unroll
        for (int i = 0; i < 8; ++i) bound[u] += fmaxf(qv[i] * lo[i], qv[i] * hi[i]);
      }
    }
#pragma unroll
    for (int offset = CH / 2; offset > 0; offset /= 2) {
#pragma unroll
      for (int u = 0; u < G; ++u) bound[u] += __shfl_xor_sync(0xffffffffu, bound[u], offset);
    }
#pragma unroll
    for (int u = 0; u < G; ++u) {
      if (g0 + u < group) best = fmaxf(best, bound[u]);
    }
  }
  if (t < items && c == 0) p.scores[pair] = best;
}

constexpr int kTopkThreads = 512;
constexpr int kTopkWarps = kTopkThreads / 32;
// Rows of up to this many candidates stage their scores and page ids in shared memory (64 KB: 128K
// tokens at page size 16); longer rows re-read them from global memory (the L2) at each pass.
constexpr int kTopkSharedKeys = 8192;
// Candidates each thread loads per round while staging, all in flight at once.
constexpr int kTopkBatch = 8;
// A digit bin holding at most this many keys is finished by one warp ranking them, not by more passes.
constexpr int kRankWarp = 32;

// Larger float, larger key; -0 and +0 are one key (they compare equal on the host), and NaN sorts
// above everything, deterministically.
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = f == 0.0f ? 0u : __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Where the selection stands: candidates whose masked key is above `prefix` are taken, and of those
// equal to it the first `remaining` in page order. `count` is how many candidates are equal to it.
struct Threshold {
  uint32_t prefix, mask;
  int remaining, count;
};

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

// The exclusive prefix sums over the block of each thread's (x, y), through `warp_totals`.
__device__ __forceinline__ int2 block_exclusive_sum(int2 v, int2* warp_totals) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int2 inclusive = v;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const int ux = __shfl_up_sync(0xffffffffu, inclusive.x, offset);
    const int uy = __shfl_up_sync(0xffffffffu, inclusive.y, offset);
    if (lane >= offset) inclusive.x += ux, inclusive.y += uy;
  }
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  int2 before = make_int2(inclusive.x - v.x, inclusive.y - v.y);
#pragma unroll
  for (int w = 0; w < kTopkWarps; ++w) {
    const int2 total = warp_totals[w];
    if (w < warp) before.x += total.x, before.y += total.y;
  }
  return before;
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
      if (warp == 0) {
        const uint32_t key = lane < th.count ? member_key[lane] : 0u;
        const int index = lane < th.count ? member_index[lane] : 0;
        int rank = 0, ties_through = 0;
#pragma unroll
        for (int m = 0; m < kRankWarp; ++m) {
          const uint32_t km = __shfl_sync(0xffffffffu, key, m);
          const int im = __shfl_sync(0xffffffffu, index, m);
          if (m < th.count) {
            rank += km > key || (km == key && im < index);
            ties_through += km == key && im <= index;
          }
        }
        if (lane < th.count && rank == th.remaining - 1) shared_threshold = {key, ~0u, ties_through, 0};
      }
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
  const int2 start = block_exclusive_sum(counts, warp_totals);
  int32_t* out = p.out_indices + row_offset;
  int slot = start.x + min(start.y, th.remaining), ties = start.y;
#pragma unroll 4
  for (int j = j0; j < j1; ++j) {
    const uint32_t masked = key_at(j) & th.mask;
    if (masked > th.prefix || (masked == th.prefix && ties++ < th.remaining)) out[slot++] = id_at(j);
  }
}

// Raises the staged top-k kernel's dynamic shared-memory limit once per device.
void allow_topk_smem(size_t bytes) {
  static std::mutex mutex;
  static std::set<int> done;
  int device = 0;
  KV_CUDA(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mutex);
  if (done.count(device)) return;
  KV_CUDA(cudaFuncSetAttribute(topk_pages_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(bytes)));
  done.insert(device);
}

}  // namespace

void launch_quest_update_meta(const QuestMetaParams& p, cudaStream_t stream) {
  dispatch_dtype(p.dtype, [&](auto t) {
    quest_meta_kernel<decltype(t)><<<p.num_pages_to_update, 256, 0, stream>>>(p);
  });
  check_launch("quest_meta_kernel");
}

void launch_quest_scores(const QuestScoreParams& p, cudaStream_t stream) {
  const int64_t threads = int64_t(p.nnz) * p.shape.num_kv_heads * (p.shape.head_dim / 8);
  const unsigned blocks = static_cast<unsigned>((threads + kScoreThreads - 1) / kScoreThreads);
  dispatch_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    switch (p.shape.head_dim) {
      case 64: quest_scores_kernel<T, 64><<<blocks, kScoreThreads, 0, stream>>>(p); break;
      case 128: quest_scores_kernel<T, 128><<<blocks, kScoreThreads, 0, stream>>>(p); break;
      default: quest_scores_kernel<T, 256><<<blocks, kScoreThreads, 0, stream>>>(p); break;
    }
  });
  check_launch("quest_scores_kernel");
}

void launch_topk_pages(const TopkPagesParams& p, cudaStream_t stream) {
  if (p.batch == 0) return;
  const unsigned blocks = static_cast<unsigned>(p.batch * p.num_kv_heads);
  if (p.max_pages - 1 <= kTopkSharedKeys) {
    allow_topk_smem(2 * sizeof(uint32_t) * kTopkSharedKeys);
    const size_t smem = 2 * sizeof(uint32_t) * std::max(p.max_pages - 1, 1);
    launch_programmatic(topk_pages_kernel<true>, dim3(blocks), dim3(kTopkThreads), smem, device_has_pdl(), stream, p);
  } else {
    launch_programmatic(topk_pages_kernel<false>, dim3(blocks), dim3(kTopkThreads), 0, device_has_pdl(), stream, p);
  }
  check_launch("topk_pages_kernel");
}

}  // namespace kvflash::cuda
