// What the paged decode kernels share (decode.cu, decode_quant.cu): launch constants, the
// online-softmax step, the block epilogue, the split-K planner and the kernel that merges
// the splits' partial (out, lse) pairs. Included by .cu files only; everything sits in an anonymous
// namespace so each translation unit gets its own kernels and no symbol crosses units.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include "../core/errors.h"
#include "context.h"
#include "pdl.cuh"
#include "ptx.cuh"

namespace kvflash::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMinSplitTokens = 256;  // below this a split costs more in merging than it gains
constexpr int kMaxSplits = 256;

// What every paged decode kernel's argument struct starts with: queries and outputs, the split-K
// partials (set by launch_decode_and_merge), the page table, head counts and the softmax scale.
struct DecodeIO {
  const void* q;
  void* out;
  float* lse;
  float* part_out;  // [B*H, splits, D], only when split
  float* part_lse;  // [B*H, splits], log2 domain
  const int32_t* indptr;
  const int32_t* indices;
  const int32_t* last_page_len;
  int num_heads, num_kv_heads, group, log2_page;
  float scale_log2;  // scale * log2(e): the softmax runs on exp2
};

// Four floats to four elements in one 8-byte store.
template <typename T>
__device__ __forceinline__ void store4(T* dst, float4 v) {
  uint2 packed = make_uint2(Elem<T>::pack(v.x, v.y), Elem<T>::pack(v.z, v.w));
  *reinterpret_cast<uint2*>(dst) = packed;
}

// Shared-memory rows of D elements, addressed in 16-byte chunks XOR-swizzled by the row's low three
// bits: the 8 rows one ldmatrix phase reads then land in 8 distinct bank groups.
template <int D>
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// One 16-token step of the online softmax over an m16n8k16 score tile s[j][e] (row lane/4 for e < 2,
// lane/4 + 8 else; token pos0 + j*8 + (lane&3)*2 + (e&1)), in the exp2 domain: masks tokens at or
// past `end`, rescales the running (m, l, o), and returns the probabilities packed as the A operand
// of the P V product (the score tile's accumulator layout is that operand's layout).
template <typename T, int NT>
__device__ __forceinline__ void softmax_step(float (&s)[2][4], int pos0, int end, float scale_log2, float (&m)[2],
                                             float (&l)[2], float (&o)[NT][4], uint32_t (&pa)[4]) {
  const int lane = threadIdx.x & 31;
  float rmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int j = 0; j < 2; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int pos = pos0 + j * 8 + (lane & 3) * 2 + (e & 1);
      s[j][e] = pos < end ? s[j][e] * scale_log2 : -INFINITY;
      rmax[e >> 1] = fmaxf(rmax[e >> 1], s[j][e]);
    }
  }
  float use[2], factor[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    rmax[r] = fmaxf(rmax[r], __shfl_xor_sync(0xffffffffu, rmax[r], 1));
    rmax[r] = fmaxf(rmax[r], __shfl_xor_sync(0xffffffffu, rmax[r], 2));
    const float mn = fmaxf(m[r], rmax[r]);
    use[r] = mn == -INFINITY ? 0.f : mn;  // keeps exp2 of an all-masked row at 0, not NaN
    factor[r] = exp2f(m[r] - use[r]);
    m[r] = mn;
  }
  float p[2][4];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) p[j][e] = exp2f(s[j][e] - use[e >> 1]);
  }
  l[0] = l[0] * factor[0] + (p[0][0] + p[0][1] + p[1][0] + p[1][1]);
  l[1] = l[1] * factor[1] + (p[0][2] + p[0][3] + p[1][2] + p[1][3]);
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    o[n][0] *= factor[0];
    o[n][1] *= factor[0];
    o[n][2] *= factor[1];
    o[n][3] *= factor[1];
  }
  pa[0] = Elem<T>::pack(p[0][0], p[0][1]);
  pa[1] = Elem<T>::pack(p[0][2], p[0][3]);
  pa[2] = Elem<T>::pack(p[1][0], p[1][1]);
  pa[3] = Elem<T>::pack(p[1][2], p[1][3]);
}

// The block's epilogue after its warps left their partial (o, m, l) in shared memory: o_s [warps][16][D]
// (row-major, unnormalized), m_s and l_s [warps][16] (log2 domain). Warp w holds head tile w % MTILES;
// the SLICES warps of a tile split its tokens. Merges them per head and writes out (and lse) when
// the sequence is not split, else the split's normalized partial and its log2-sum-exp. THREADS: the
// block's threads, which share the work.
template <typename T, int D, int SLICES, int MTILES, int THREADS = kThreads>
__device__ __forceinline__ void store_block_output(const float* o_s, const float* m_s, const float* l_s, int nheads,
                                                   int64_t row0, int split, int num_splits, void* out, float* lse,
                                                   float* part_out, float* part_lse) {
  for (int i = threadIdx.x; i < nheads * (D / 4); i += THREADS) {
    const int r = i / (D / 4), d = (i % (D / 4)) * 4;
    const int mt = r / 16, rr = r % 16;
    float mx = -INFINITY;
#pragma unroll
    for (int sl = 0; sl < SLICES; ++sl) mx = fmaxf(mx, m_s[(mt + sl * MTILES) * 16 + rr]);
    const float use = mx == -INFINITY ? 0.f : mx;
    float den = 0.f;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int sl = 0; sl < SLICES; ++sl) {
      const int w = mt + sl * MTILES;
      const float f = exp2f(m_s[w * 16 + rr] - use);
      den += f * l_s[w * 16 + rr];
      const float4 v = *reinterpret_cast<const float4*>(o_s + (w * 16 + rr) * D + d);
      acc.x += f * v.x;
      acc.y += f * v.y;
      acc.z += f * v.z;
      acc.w += f * v.w;
    }
    const float inv = den > 0.f ? 1.f / den : 0.f;
    acc.x *= inv;
    acc.y *= inv;
    acc.z *= inv;
    acc.w *= inv;
    const float lse2 = den > 0.f ? use + log2f(den) : -INFINITY;
    const int64_t row = row0 + r;
    if (num_splits == 1) {
      store4(static_cast<T*>(out) + row * D + d, acc);
      if (d == 0 && lse) lse[row] = lse2 * kLn2;
    } else {
      const int64_t slot = row * num_splits + split;
      *reinterpret_cast<float4*>(part_out + slot * D + d) = acc;
      if (d == 0) part_lse[slot] = lse2;
    }
  }
}

// The end of a decode block: once every copy has landed (the ring is free), each warp leaves its
// partial (o, m, l) of 16 head rows in shared memory (l summed over the quad first), then
// store_block_output merges them (the block is SLICES * MTILES warps). `column(n, c)` is the channel
// that column c (0..7) of output tile n holds: the kernels may permute channels across fragments to
// make their operand loads contiguous.
template <typename T, int D, int SLICES, int MTILES, int NT, typename Column>
__device__ __forceinline__ void finish_block(unsigned char* smem, const float (&o)[NT][4], const float (&m)[2],
                                             float (&l)[2], Column column, int nheads, int64_t row0, int split,
                                             int num_splits, void* out, float* lse, float* part_out,
                                             float* part_lse) {
  cp_async_wait<0>();
  __syncthreads();
  constexpr int WARPS = SLICES * MTILES;
  float* o_s = reinterpret_cast<float*>(smem);  // [WARPS][16][D]
  float* m_s = o_s + WARPS * 16 * D;            // [WARPS][16]
  float* l_s = m_s + WARPS * 16;                // [WARPS][16]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, c2 = (lane & 3) * 2;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  float* ow = o_s + warp * 16 * D;
#pragma unroll
  for (int n = 0; n < NT; ++n) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      ow[g * D + column(n, c2 + e)] = o[n][e];
      ow[(g + 8) * D + column(n, c2 + e)] = o[n][2 + e];
    }
  }
  if ((lane & 3) == 0) {
    m_s[warp * 16 + g] = m[0];
    m_s[warp * 16 + g + 8] = m[1];
    l_s[warp * 16 + g] = l[0];
    l_s[warp * 16 + g + 8] = l[1];
  }
  __syncthreads();
  store_block_output<T, D, SLICES, MTILES, WARPS * 32>(o_s, m_s, l_s, nheads, row0, split, num_splits, out, lse,
                                                       part_out, part_lse);
}

// exp2(m - ref), with an empty partial (m = -inf) weighing 0 even when ref is -inf too.
__device__ __forceinline__ float weight(float m, float ref) { return m == -INFINITY ? 0.f : exp2f(m - ref); }

// One block per (sequence, query head). Warps take interleaved batches of splits; each batch's lse
// values and partial rows are requested together (lanes own 4 columns each), so a merge of up to
// kWarps * kBatch splits costs one L2 round trip. Each warp keeps a running (max, denominator,
// weighted sum) across its batches, and the warps meet in shared memory.
template <typename T>
__global__ void __launch_bounds__(kThreads) merge_splits_kernel(const float* part_out, const float* part_lse,
                                                                void* out, float* lse, int splits, int head_dim) {
  constexpr int kBatch = 8;   // partial rows one warp has in flight per pass of 128 columns
  constexpr int kPasses = 2;  // 128 columns per pass: head_dim up to 256
  __shared__ float4 warp_sum[kWarps][kPasses * 32];
  __shared__ float warp_max[kWarps], warp_den[kWarps];
  // Launched early (programmatic dependent launch): wait here until the decode grid's writes are visible.
  wait_for_previous_grid();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row = blockIdx.x;
  const float* pl = part_lse + row * splits;
  const float* po = part_out + row * splits * head_dim;
  float mx = -INFINITY, den = 0.f;
  float4 acc[kPasses];
#pragma unroll
  for (int c = 0; c < kPasses; ++c) acc[c] = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int s0 = warp * kBatch; s0 < splits; s0 += kWarps * kBatch) {
    const int n = min(kBatch, splits - s0);
    const float x = lane < n ? __ldcg(pl + s0 + lane) : -INFINITY;  // lane j: split s0 + j
    // Past the last split or column: a repeat of a valid one, weighted 0 or never stored.
    float4 v[kPasses][kBatch];
#pragma unroll
    for (int c = 0; c < kPasses; ++c) {
      const int d = min(c * 128 + lane * 4, head_dim - 4);
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const float4* src = reinterpret_cast<const float4*>(po + (s0 + min(j, n - 1)) * head_dim + d);
        v[c][j] = c * 128 < head_dim ? __ldcg(src) : make_float4(0.f, 0.f, 0.f, 0.f);
      }
    }
    float bmax = x;
#pragma unroll
    for (int k = 16; k > 0; k >>= 1) bmax = fmaxf(bmax, __shfl_xor_sync(0xffffffffu, bmax, k));
    const float nm = fmaxf(mx, bmax);
    const float rescale = weight(mx, nm);
    const float w_lane = weight(x, nm);
    float wsum = w_lane;
#pragma unroll
    for (int k = 16; k > 0; k >>= 1) wsum += __shfl_xor_sync(0xffffffffu, wsum, k);
    den = den * rescale + wsum;
    mx = nm;
#pragma unroll
    for (int c = 0; c < kPasses; ++c) {
      acc[c].x *= rescale;
      acc[c].y *= rescale;
      acc[c].z *= rescale;
      acc[c].w *= rescale;
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const float w = __shfl_sync(0xffffffffu, w_lane, j);
        acc[c].x += w * v[c][j].x;
        acc[c].y += w * v[c][j].y;
        acc[c].z += w * v[c][j].z;
        acc[c].w += w * v[c][j].w;
      }
    }
  }
#pragma unroll
  for (int c = 0; c < kPasses; ++c) warp_sum[warp][c * 32 + lane] = acc[c];
  if (lane == 0) {
    warp_max[warp] = mx;
    warp_den[warp] = den;
  }
  __syncthreads();
  float total_max = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total_max = fmaxf(total_max, warp_max[w]);
  float f[kWarps], total_den = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    f[w] = weight(warp_max[w], total_max);
    total_den += f[w] * warp_den[w];
  }
  const float inv = total_den > 0.f ? 1.f / total_den : 0.f;
  for (int i = threadIdx.x; i < head_dim / 4; i += kThreads) {
    float4 t = make_float4(0.f, 0.f, 0.f, 0.f);  // columns 4i..4i+3: pass i / 32, lane i % 32
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float4 u = warp_sum[w][i];
      t.x += f[w] * u.x;
      t.y += f[w] * u.y;
      t.z += f[w] * u.z;
      t.w += f[w] * u.w;
    }
    store4(static_cast<T*>(out) + row * head_dim + i * 4, make_float4(t.x * inv, t.y * inv, t.z * inv, t.w * inv));
  }
  if (threadIdx.x == 0 && lse) lse[row] = total_den > 0.f ? (total_max + log2f(total_den)) * kLn2 : -INFINITY;
}

// ---- host side ----------------------------------------------------------------------------

// Per (device, kernel): raises the kernel's dynamic shared-memory limit to `smem` once and caches SMs x
// resident blocks. Also reports whether the device has programmatic dependent launch (compute 9+).
inline int resident_blocks(const void* kernel, size_t smem, bool* has_pdl = nullptr, int threads = kThreads) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, std::pair<int, bool>> cache;
  int device = 0;
  KV_CUDA(cudaGetDevice(&device));
  const auto key = std::make_pair(device, kernel);
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it == cache.end()) {
    KV_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    int sms = 0, per_sm = 0, major = 0;
    KV_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    KV_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    KV_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
    it = cache.emplace(key, std::make_pair(sms * (per_sm > 0 ? per_sm : 1), major >= 9)).first;
  }
  if (has_pdl) *has_pdl = it->second.second;
  return it->second.first;
}

inline int floor_log2(int x) {
  int r = 0;
  while ((1 << (r + 1)) <= x) ++r;
  return r;
}

// Fills a kernel argument struct's DecodeIO from a decode's params (DecodeParams, QuantDecodeParams,
// QuestDecodeParams); the split partials stay null.
template <typename Params>
void fill_decode_io(DecodeIO& io, const Params& p) {
  io.q = p.q;
  io.out = p.out;
  io.lse = p.lse;
  io.indptr = p.kv.indptr;
  io.indices = p.kv.indices;
  io.last_page_len = p.kv.last_page_len;
  io.num_heads = p.shape.num_q_heads;
  io.num_kv_heads = p.shape.num_kv_heads;
  io.group = p.shape.num_q_heads / p.shape.num_kv_heads;
  io.log2_page = floor_log2(p.kv.page_size);
  io.scale_log2 = p.scale * kLog2e;
}

// The split-K planner, from host-known capacities only (so one workspace size serves every launch
// with them): enough splits to give each resident block slot one block (never more: a second wave of
// half-length blocks takes as long as one of full length), each split at least kMinSplitTokens and
// whole tiles of `tile` tokens, then as few splits as cover the same tiles per split. `base` is the
// blocks per split (batch x KV heads x head chunks); forced > 0 fixes the count.
inline int plan_splits(int64_t base, int64_t slots, int64_t max_len, int tile, int forced) {
  const int64_t tiles = std::max<int64_t>((max_len + tile - 1) / tile, 1);
  int64_t splits = 1;
  if (forced > 0) {
    splits = forced;
  } else {
    splits = base > 0 ? slots / base : 1;
    splits = std::min<int64_t>(splits, (max_len + kMinSplitTokens - 1) / kMinSplitTokens);
  }
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, kMaxSplits, tiles}));
  const int64_t tiles_per_split = (tiles + splits - 1) / splits;
  if (forced <= 0) splits = (tiles + tiles_per_split - 1) / tiles_per_split;
  return static_cast<int>(splits);
}

using MergeLauncher = void (*)(const float* part_out, const float* part_lse, void* out, float* lse, int64_t rows,
                               int splits, int head_dim, bool has_pdl, cudaStream_t stream);

// Launches the split merge over `rows` (sequence, query head) rows; with PDL its launch latency hides
// behind the decode grid's tail. A merge by the last split of each row instead (a counter per row,
// as the fused Quest decode does) measured slower on the H100: 55.9 against 54.7 us at B = 1, L =
// 32768, and 3-7% on the quantized decodes there; the grid's end wakes the waiting merge sooner
// than a counter round trip does.
template <typename T>
void launch_merge(const float* part_out, const float* part_lse, void* out, float* lse, int64_t rows, int splits,
                  int head_dim, bool has_pdl, cudaStream_t stream) {
  launch_programmatic(merge_splits_kernel<T>, dim3(static_cast<unsigned>(rows)), dim3(kThreads), 0, has_pdl, stream,
                      part_out, part_lse, out, lse, splits, head_dim);
  check_launch("merge_splits_kernel");
}

// Split-K workspace: the splits' partial outputs [rows][splits][D], then their log2-sum-exps
// [rows][splits] (rows = sequences x query heads).
inline size_t split_workspace_bytes(int splits, int64_t rows, int head_dim) {
  return splits <= 1 ? 0 : static_cast<size_t>(splits) * rows * (head_dim + 1) * sizeof(float);
}

// Launches a decode grid and, when it is split, the merge of its partials. Args is the kernel's
// argument struct: a DecodeIO (part_out / part_lse set here from the workspace) with num_splits.
template <typename Args>
void launch_decode_and_merge(void (*kernel)(Args), MergeLauncher merge, Args a, dim3 grid,
                             size_t smem, int64_t rows, int head_dim, void* workspace, bool has_pdl,
                             cudaStream_t stream, const char* name) {
  if (a.num_splits > 1) {
    KV_CHECK(workspace != nullptr, Shape, name, " needs ", split_workspace_bytes(a.num_splits, rows, head_dim),
             " bytes of workspace");
    a.part_out = static_cast<float*>(workspace);
    a.part_lse = a.part_out + rows * a.num_splits * head_dim;
  }
  // Early, so the blocks are resident when the previous grid (Quest's top-k, say) ends.
  launch_programmatic(kernel, grid, dim3(kThreads), smem, has_pdl, stream, a);
  check_launch(name);
  if (a.num_splits > 1) merge(a.part_out, a.part_lse, a.out, a.lse, rows, a.num_splits, head_dim, has_pdl, stream);
}

}  // namespace
}  // namespace kvflash::cuda
