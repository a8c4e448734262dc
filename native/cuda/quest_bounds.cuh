// Quest's page bound on the tensor cores, shared by the scores kernel (quest.cu) and the fused Quest
// decode (quest_decode.cu) so that both compute every score bit for bit alike.
//
// U_p = sum_d max(q_d lo_d, q_d hi_d) = sum_d min(q_d, 0) lo_d + max(q_d, 0) hi_d, and every product
// is exact (a stored value times q_d or 0). So the bound is a dot product of length 2D between the
// query row [min(q, 0) | max(q, 0)] and the page row [lo | hi]: one m16n8k16 product bounds 8 pages
// for 16 query heads over 16 of those channels. The tensor cores take the arithmetic (about a
// microsecond of CUDA-core work per SM at 32K tokens) off the path of the metadata streaming in.
// The metadata streams in by 16-byte cp.async: Hopper's bulk copies (one per half row, on an
// mbarrier a ring stage, into padded rows) measured slower in the fused decode (H100, B=1, 2048-token
// budget: 128K tokens 39.5 us against 36.7, 32K 22.6 against 22.4).
#pragma once
#include "decode_common.cuh"
#include "scalar.cuh"

namespace kvflash::cuda {
namespace {

// Pages whose [lo | hi] rows fill one 32 KB stage of the metadata ring.
template <int D>
constexpr int kBoundChunk = 8192 / D;

// Larger float, larger key; -0 and +0 are one key (they compare equal on the host), and NaN sorts
// above everything, deterministically.
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = f == 0.0f ? 0u : __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The A operand: rows [min(q, 0) | max(q, 0)] of `heads` query heads (q points at the first), zero
// rows up to `rows` (a multiple of 16), 2D elements a row in swizzled 16-byte chunks. WARPS (here and
// below): the block's warps, which share the work.
template <typename T, int D, int WARPS>
__device__ __forceinline__ void stage_bound_queries(const T* q, int heads, int rows, T* dst) {
  constexpr int HALF = D / 8;  // chunks of one half
  for (int i = threadIdx.x; i < rows * 2 * HALF; i += WARPS * 32) {
    const int r = i / (2 * HALF), c = i % (2 * HALF);
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (r < heads) {
      v = *reinterpret_cast<const uint4*>(q + static_cast<int64_t>(r) * D + (c % HALF) * 8);
      T* e = reinterpret_cast<T*>(&v);
      const bool upper = c >= HALF;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float x = to_float(e[j]);
        if (upper ? !(x > 0.f) : !(x < 0.f)) e[j] = from_float<T>(0.f);
      }
    }
    *reinterpret_cast<uint4*>(dst + swz<2 * D>(r, c)) = v;
  }
}

// Copies the [lo | hi] rows of KV head h of `count` pages (ids in shared memory) into rows 0.. of
// `dst`, and zeros up to the next multiple of 16 rows, so every tile the bound reads is defined.
template <typename T, int D, int WARPS>
__device__ __forceinline__ void copy_page_bounds(const T* meta, int kv_heads, int h, const int32_t* ids, int count,
                                                 T* dst) {
  constexpr int HALF = D / 8;
  const int rows = (count + 15) & ~15;
#pragma unroll 4
  for (int i = threadIdx.x; i < rows * 2 * HALF; i += WARPS * 32) {
    const int r = i / (2 * HALF), c = i % (2 * HALF);
    const bool valid = r < count;
    const int64_t page = valid ? ids[r] : 0;
    const T* src = meta + ((page * 2 + (c >= HALF)) * kv_heads + h) * D + (c % HALF) * 8;
    cp_async16(smem_addr(dst + swz<2 * D>(r, c)), src, valid);
  }
}

// The bounds of the 16 pages in rows p0 .. p0 + 15 of the staged page rows, maxed over the `heads`
// query heads of tiles 0 .. mtiles - 1: every lane ends with page p0 + j * 8 + 2 * (lane & 3) + e in
// best[j][e].
template <typename T, int D>
__device__ __forceinline__ void bound_16_pages(uint32_t q_base, uint32_t page_base, int p0, int mtiles, int heads,
                                               float (&best)[2][2]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < 2; ++j) best[j][0] = best[j][1] = -INFINITY;
  for (int mt = 0; mt < mtiles; ++mt) {
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int kk = 0; kk < 2 * D / 16; ++kk) {
      uint32_t qa[4], pb[4];
      ldsm_x4(qa, q_base + 2 * swz<2 * D>(mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, kk * 2 + (lane >> 4)));
      ldsm_x4(pb, page_base + 2 * swz<2 * D>(p0 + (lane & 7) + (lane >> 4) * 8, kk * 2 + ((lane >> 3) & 1)));
      Elem<T>::mma(s[0], qa, pb[0], pb[1]);
      Elem<T>::mma(s[1], qa, pb[2], pb[3]);
    }
    const int r = mt * 16 + (lane >> 2);  // this lane's rows: r and r + 8
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float v = r < heads ? s[j][e] : -INFINITY;
        if (r + 8 < heads) v = fmaxf(v, s[j][e + 2]);
        best[j][e] = fmaxf(best[j][e], v);
      }
    }
  }
#pragma unroll
  for (int offset = 4; offset < 32; offset *= 2) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      best[j][0] = fmaxf(best[j][0], __shfl_xor_sync(0xffffffffu, best[j][0], offset));
      best[j][1] = fmaxf(best[j][1], __shfl_xor_sync(0xffffffffu, best[j][1], offset));
    }
  }
}

// Block-wide: the bounds of `count` pages (ids in shared memory) for KV head h, through a two-stage
// ring of kBoundChunk pages (both stages in flight while the previous chunk is bounded); calls
// put(i, bound) once per page i, from lanes 0..3 of the warp that bounded it. q_base holds the
// staged queries (stage_bound_queries). Ends with a barrier and no copy in flight.
template <typename T, int D, int WARPS, typename Put>
__device__ __forceinline__ void bound_pages(const T* meta, int kv_heads, int h, const int32_t* ids, int count,
                                            uint32_t q_base, int mtiles, int heads, T* ring, Put put) {
  constexpr int CHUNK = kBoundChunk<D>;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int chunks = (count + CHUNK - 1) / CHUNK;
  auto issue = [&](int c) {
    if (c < chunks) {
      copy_page_bounds<T, D, WARPS>(meta, kv_heads, h, ids + c * CHUNK, min(CHUNK, count - c * CHUNK),
                                    ring + (c & 1) * CHUNK * 2 * D);
    }
    cp_async_commit();
  };
  issue(0);
  issue(1);
  for (int c = 0; c < chunks; ++c) {
    cp_async_wait<1>();
    __syncthreads();  // chunk c landed for every thread
    const int n = min(CHUNK, count - c * CHUNK);
    const uint32_t base = smem_addr(ring + (c & 1) * CHUNK * 2 * D);
    for (int g = warp; g * 16 < n; g += WARPS) {
      float best[2][2];
      bound_16_pages<T, D>(q_base, base, g * 16, mtiles, heads, best);
      if (lane < 4) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int i = g * 16 + j * 8 + 2 * lane + e;
            if (i < n) put(c * CHUNK + i, best[j][e]);
          }
        }
      }
    }
    __syncthreads();  // every warp is done with the stage refilled next
    issue(c + 2);
  }
}

}  // namespace
}  // namespace kvflash::cuda
