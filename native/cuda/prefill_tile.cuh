// What the FlashAttention-2-style prefill kernels share (prefill.cu over full-precision K/V,
// prefill_quant.cu over quantized pages): the swizzled
// shared-memory tile layout, and everything a block does once its K/V tile is in shared memory: a
// warp's S = Q K^T, masks, online softmax and O += P V on one tile, and the epilogue. The kernels differ
// only in how a K/V tile reaches shared memory. Included by .cu files only; everything sits in an
// anonymous namespace so each translation unit gets its own copies and no symbol crosses units.
//
// A block owns BM = 16 * MT * WARPS queries of one (sequence, head); warp w owns rows 16 * MT * w ..
// 16 * MT * (w + 1) of that tile. Shared memory starts with the block's Q tile [BM][D] (the epilogue
// writes the output through it); K and V tiles are [BN][D]. Every row of D elements of the element
// type is stored as 16-byte chunks XOR-swizzled by the row's low three bits, so that ldmatrix's 8-row
// reads hit 8 different bank groups.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../core/attention_params.h"
#include "ptx.cuh"

namespace kvflash::cuda {
namespace {

// Byte offset of 16-byte chunk `chunk` of row `row` in a shared tile of rows of D elements.
template <int D>
__device__ __forceinline__ uint32_t swz(int row, int chunk) {
  return static_cast<uint32_t>(row * (D * 2) + ((chunk ^ (row & 7)) << 4));
}

// ---------------------------------------------------------------------------------------------
// The block's query tile

// Rows q0 .. q0 + BM of one (sequence, head)'s sq queries (from row q_start of q), aligned to the end
// of the sequence's sk keys, and the K/V tiles of BN keys its rows see.
struct QueryTile {
  int q_start, q0, sq, sk;
  int pos_lo, pos_hi;  // positions (in key coordinates) of the tile's first and last real query
  int t_begin, t_end;  // tiles t_begin .. t_end hold every key a row sees (none when t_end < t_begin)
  bool causal;
  int window;
  float scale_log2;
};

template <int BM, int BN>
__device__ __forceinline__ QueryTile query_tile(int q_start, int q0, int sq, int sk, const AttentionMask& mask) {
  QueryTile qt;
  qt.q_start = q_start, qt.q0 = q0, qt.sq = sq, qt.sk = sk;
  qt.causal = mask.causal;
  qt.window = mask.window_left;
  // The binding guarantees scale > 0 and finite: the max of the raw logits then scales to the max
  // of the scaled ones, so the scale folds into the one FFMA before each exp2.
  qt.scale_log2 = mask.scale * kLog2e;
  qt.pos_lo = sk - sq + q0;
  qt.pos_hi = sk - sq + min(q0 + BM, sq) - 1;
  const int key_hi = qt.causal ? min(sk - 1, qt.pos_hi) : sk - 1;
  const int key_lo = qt.window >= 0 ? max(0, qt.pos_lo - qt.window) : 0;
  qt.t_begin = key_lo / BN;
  qt.t_end = key_hi >= key_lo ? key_hi / BN : qt.t_begin - 1;
  return qt;
}

// Issues the cp.async of head h's rows of the query tile into sQ (rows past the sequence are zeros).
template <typename T, int D, int BM, int THREADS>
__device__ __forceinline__ void load_query_tile(uint32_t sQ, const void* q, const QueryTile& qt, int h, int num_heads) {
  constexpr int kChunks = D / 8;
  static_assert((BM * kChunks) % THREADS == 0, "even tile loads");
  const int64_t q_row_stride = static_cast<int64_t>(num_heads) * D;
#pragma unroll
  for (int it = 0; it < BM * kChunks / THREADS; ++it) {
    const int i = threadIdx.x + it * THREADS;
    const int r = i / kChunks, c = i % kChunks;
    const bool ok = qt.q0 + r < qt.sq;
    const T* src = static_cast<const T*>(q) + (ok ? (qt.q_start + qt.q0 + r) * q_row_stride + h * D + c * 8 : 0);
    cp_async16(sQ + swz<D>(r, c), src, ok);
  }
}

// ---------------------------------------------------------------------------------------------
// One warp's rows: o accumulates P V, m is the running max of the log2-scaled logits of rows g and
// g + 8 of each 16-row slice (g = lane / 4), l this thread's share of the running denominators.

template <int D, int MT>
__device__ __forceinline__ void init_rows(float (&o)[MT][D / 8][4], float (&m)[MT][2], float (&l)[MT][2]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) m[mt][0] = m[mt][1] = -INFINITY, l[mt][0] = l[mt][1] = 0.f;
}

// The warp's Q fragments (A operands of every k-step) from the shared Q tile.
template <int D, int MT>
__device__ __forceinline__ void load_q_fragments(uint32_t (&qf)[MT][D / 16][4], uint32_t sQ, int warp_row) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      ldsm_x4(qf[mt][kk], sQ + swz<D>(warp_row + mt * 16 + (lane & 15), kk * 2 + (lane >> 4)));
}

// The warp's work on the K/V tile of keys n0 .. n0 + BN (rows of the shared tiles at k_tile, v_tile;
// rows past the sequence must hold finite values): S = Q K^T, the masks, the online softmax update of
// (o, m, l) and O += P V. With Q_IN_REGS the Q fragments come from qf, else from the shared Q tile.
template <typename T, int D, int MT, int BN, bool Q_IN_REGS>
__device__ __forceinline__ void attend_tile(const QueryTile& qt, uint32_t sQ,
                                            const uint32_t (&qf)[Q_IN_REGS ? MT : 1][Q_IN_REGS ? D / 16 : 1][4],
                                            uint32_t k_tile, uint32_t v_tile, int n0, int warp_row,
                                            float (&o)[MT][D / 8][4], float (&m)[MT][2], float (&l)[MT][2]) {
  using E = Elem<T>;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;  // row within the mma fragment (and g + 8)
  const int tq = lane & 3;  // column pair within the fragment
  const int sk = qt.sk, pos_lo = qt.pos_lo, pos_hi = qt.pos_hi, window = qt.window;
  const bool causal = qt.causal;
  const float scale_log2 = qt.scale_log2;

  // A warp none of whose rows sees a key of this tile (above the causal diagonal, left of the
  // window, or past the last query) skips it: its P would be all zeros, leaving m, l and O as
  // they are. Warp-uniform, and no barrier inside, so the other warps run on meanwhile.
  const int w_lo = pos_lo + warp_row;  // positions of the warp's first and last real rows
  const int w_hi = min(w_lo + 16 * MT - 1, pos_hi);
  const bool live = w_lo <= w_hi && (!causal || n0 <= w_hi) && (window < 0 || n0 + BN - 1 >= w_lo - window);
  if (live) {

    // S = Q K^T (unscaled) for this warp's rows and BN keys.
    float s[MT][BN / 8][4];
  #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
  #pragma unroll
      for (int n = 0; n < BN / 8; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
  #pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[MT][4];
  #pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if constexpr (Q_IN_REGS) {
  #pragma unroll
          for (int x = 0; x < 4; ++x) a[mt][x] = qf[mt][kk][x];
        } else {
          ldsm_x4(a[mt], sQ + swz<D>(warp_row + mt * 16 + (lane & 15), kk * 2 + (lane >> 4)));
        }
      }
  #pragma unroll
      for (int nn = 0; nn < BN / 16; ++nn) {
        uint32_t bk[4];
        const int key = nn * 16 + (lane & 7) + ((lane >> 4) << 3);
        ldsm_x4(bk, k_tile + swz<D>(key, kk * 2 + ((lane >> 3) & 1)));
  #pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          E::mma(s[mt][2 * nn], a[mt], bk[0], bk[1]);
          E::mma(s[mt][2 * nn + 1], a[mt], bk[2], bk[3]);
        }
      }
    }

    // Masks are uniform per tile: decide once whether any key of this tile can be out of range.
    // (Deciding per warp is finer but measured slower: it costs registers in the hot loop.)
    const bool need_mask =
        (n0 + BN > sk) || (causal && n0 + BN - 1 > pos_lo) || (window >= 0 && n0 < pos_hi - window);
    if (need_mask) {
      // Column c = n * 8 + 2 * tq + e of the tile is key n0 + c, visible from position pos iff
      // lo <= c <= hi. Taking the thread's 2 * tq out of the bounds leaves a constant on the
      // column side: two compares and a select per logit.
  #pragma unroll
      for (int mt = 0; mt < MT; ++mt)
  #pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int pos = pos_lo + warp_row + mt * 16 + g + 8 * half;
          int hi = sk - 1 - n0;
          if (causal) hi = min(hi, pos - n0);
          hi -= 2 * tq;
          const int lo = (window >= 0 ? pos - window - n0 : 0) - 2 * tq;
  #pragma unroll
          for (int n = 0; n < BN / 8; ++n)
  #pragma unroll
            for (int e = 0; e < 2; ++e)
              if (n * 8 + e > hi || n * 8 + e < lo) s[mt][n][2 * half + e] = -INFINITY;
        }
    }

    // Online softmax: the quad of 4 lanes (same g) together holds a row's BN logits. m is kept
    // in scaled log2 units; p = 2^(s * scale_log2 - m) is one FFMA and one MUFU per logit.
  #pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      float corr[2];
  #pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = -INFINITY;
  #pragma unroll
        for (int n = 0; n < BN / 8; ++n) mx = fmaxf(mx, fmaxf(s[mt][n][2 * r], s[mt][n][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        mx = fmaxf(m[mt][r], mx * scale_log2);
        // A row with no visible key yet keeps max -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
        const float base = mx == -INFINITY ? 0.f : mx;
        corr[r] = exp2_ftz(m[mt][r] - base);
        m[mt][r] = mx;
        float sum = 0.f;
  #pragma unroll
        for (int n = 0; n < BN / 8; ++n) {
          s[mt][n][2 * r] = exp2_ftz(fmaf(s[mt][n][2 * r], scale_log2, -base));
          s[mt][n][2 * r + 1] = exp2_ftz(fmaf(s[mt][n][2 * r + 1], scale_log2, -base));
          sum += s[mt][n][2 * r] + s[mt][n][2 * r + 1];
        }
        l[mt][r] = l[mt][r] * corr[r] + sum;
      }
      // Once the running max settles, most tiles leave it unchanged for every row of the warp:
      // skip the D / 2 multiplies then (the vote keeps the branch warp-uniform).
      if (__any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f)) {
  #pragma unroll
        for (int n = 0; n < D / 8; ++n) {
          o[mt][n][0] *= corr[0];
          o[mt][n][1] *= corr[0];
          o[mt][n][2] *= corr[1];
          o[mt][n][3] *= corr[1];
        }
      }
    }

    // P in the element type, as A fragments: the S accumulators of key columns 16kk..16kk+15 are
    // exactly the A fragment of k-step kk, so P never goes through shared memory.
    uint32_t pf[MT][BN / 16][4];
  #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
  #pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        pf[mt][kk][0] = E::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pf[mt][kk][1] = E::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pf[mt][kk][2] = E::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pf[mt][kk][3] = E::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }

    // O += P V.
  #pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const int key = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
  #pragma unroll
      for (int nn = 0; nn < D / 16; ++nn) {
        uint32_t bv[4];
        ldsm_x4_trans(bv, v_tile + swz<D>(key, nn * 2 + (lane >> 4)));
  #pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          E::mma(o[mt][2 * nn], pf[mt][kk], bv[0], bv[1]);
          E::mma(o[mt][2 * nn + 1], pf[mt][kk], bv[2], bv[3]);
        }
      }
    }
  }
}

// Epilogue: finish the denominators, normalise, and write head h's rows of out (and lse when not
// null) through this warp's own Q rows in shared memory at smem (only this warp ever read them), so
// that global stores are 16 bytes wide.
template <typename T, int D, int MT>
__device__ __forceinline__ void store_rows(const QueryTile& qt, unsigned char* smem, void* out_ptr, float* lse, int h,
                                           int num_heads, int warp_row, float (&o)[MT][D / 8][4],
                                           float (&m)[MT][2], float (&l)[MT][2]) {
  using E = Elem<T>;
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2, tq = lane & 3;
  const int64_t q_row_stride = static_cast<int64_t>(num_heads) * D;
  __syncwarp();
  T* out = static_cast<T*>(out_ptr);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int slice = warp_row + mt * 16;  // first row of this slice within the block's tile
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l[mt][r] += __shfl_xor_sync(0xffffffffu, l[mt][r], 1);
      l[mt][r] += __shfl_xor_sync(0xffffffffu, l[mt][r], 2);
      inv[r] = l[mt][r] > 0.f ? 1.f / l[mt][r] : 0.f;
      const int i = qt.q0 + slice + g + 8 * r;
      if (lse != nullptr && tq == 0 && i < qt.sq) {
        lse[static_cast<int64_t>(qt.q_start + i) * num_heads + h] =
            l[mt][r] > 0.f ? (m[mt][r] + log2f(l[mt][r])) * kLn2 : -INFINITY;
      }
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      const uint32_t lo = E::pack(o[mt][n][0] * inv[0], o[mt][n][1] * inv[0]);
      const uint32_t hi = E::pack(o[mt][n][2] * inv[1], o[mt][n][3] * inv[1]);
      *reinterpret_cast<uint32_t*>(smem + swz<D>(slice + g, n) + tq * 4) = lo;
      *reinterpret_cast<uint32_t*>(smem + swz<D>(slice + g + 8, n) + tq * 4) = hi;
    }
  }
  __syncwarp();
#pragma unroll
  for (int i = lane; i < 16 * MT * kChunks; i += 32) {
    const int r = i / kChunks, c = i % kChunks;
    const int row = qt.q0 + warp_row + r;
    if (row < qt.sq) {
      const uint4 v = *reinterpret_cast<const uint4*>(smem + swz<D>(warp_row + r, c));
      *reinterpret_cast<uint4*>(out + (qt.q_start + row) * q_row_stride + h * D + c * 8) = v;
    }
  }
}

}  // namespace
}  // namespace kvflash::cuda
