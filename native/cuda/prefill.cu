// FlashAttention-2-style prefill: one block owns a tile of queries of one (sequence, head) and
// streams that sequence's K/V through shared memory in tiles, keeping an online softmax in f32.
// Ragged and paged K/V share the kernel body; they differ only in the functor that maps a key
// position to the address of its row.
//
// Data path (sm_80 and later): cp.async brings 16-byte chunks of Q, K and V into shared memory
// (rows swizzled by XOR-ing the chunk index with row & 7, so that ldmatrix's 8-row reads hit 8
// different bank groups); ldmatrix feeds mma.sync m16n8k16 with f32 accumulators. K and V are
// double-buffered: the next tile's K and V stream in during the whole of this tile's work, so the
// load latency of a tile has an iteration to hide behind. One barrier per tile (K and V land
// together): between barriers a warp runs QK^T, softmax and PV without waiting for the others, so
// warps drift apart and one warp's softmax overlaps another's mma.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "prefill.h"
#include "prefill_sm90.h"

namespace kvflash::cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------------------------
// PTX wrappers

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// A src-size of 0 writes 16 zero bytes and reads nothing: rows past the end become zeros, so
// masked keys never bring NaN from stale memory into P V.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's most recent cp.async groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// 2^x as the bare MUFU.EX2: exp2f wraps it in a fix-up for denormal inputs (three more
// instructions per logit); softmax terms below 2^-126 of the row max are flushed to 0 instead.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// The element type decides the mma flavour and how two floats pack into one A-fragment register.
template <typename T>
struct Elem;

template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

template <>
struct Elem<__half> {
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

// Byte offset of 16-byte chunk `chunk` of row `row` in a shared tile of rows of D elements.
template <int D>
__device__ __forceinline__ uint32_t swz(int row, int chunk) {
  return static_cast<uint32_t>(row * (D * 2) + ((chunk ^ (row & 7)) << 4));
}

// ---------------------------------------------------------------------------------------------
// Where key j of one (sequence, kv head) lives. slot(j) is the row index in a [rows, Hkv, D] view of
// k / v (a token index for ragged K/V, page * P + offset for pages), so both layouts share the
// address arithmetic: element offset = slot * Hkv * D + head.

template <typename T>
struct RaggedRows {
  using Params = PrefillParams;
  const T* k;
  const T* v;
  int start;
  int len;
  __device__ RaggedRows(const Params& p, int b) {
    start = p.cu_seqlens_k[b];
    len = p.cu_seqlens_k[b + 1] - start;
    k = static_cast<const T*>(p.k);
    v = static_cast<const T*>(p.v);
  }
  static constexpr bool kSlotTable = false;  // slot(j) is arithmetic: compute it where needed
  __device__ __forceinline__ int slot(int j) const { return start + j; }
};

template <typename T>
struct PagedRows {
  using Params = PagedPrefillParams;
  const T* k;
  const T* v;
  const int32_t* pages;  // this sequence's page ids
  int log2_page;
  int len;
  __device__ PagedRows(const Params& p, int b) {
    const int begin = p.kv.indptr[b];
    const int n = p.kv.indptr[b + 1] - begin;
    log2_page = __ffs(p.kv.page_size) - 1;
    len = n > 0 ? (n - 1) * p.kv.page_size + p.kv.last_page_len[b] : 0;
    pages = p.kv.indices + begin;
    k = static_cast<const T*>(p.kv.k_pages);
    v = static_cast<const T*>(p.kv.v_pages);
  }
  static constexpr bool kSlotTable = true;  // slot(j) loads a page id: fetch it ahead of use
  __device__ __forceinline__ int slot(int j) const {
    return (pages[j >> log2_page] << log2_page) | (j & ((1 << log2_page) - 1));
  }
};

// ---------------------------------------------------------------------------------------------
// The kernel. Template parameters:
//   T         element type of q, k, v, out (__nv_bfloat16 or __half)
//   D         head dim
//   MT        16-row query slices per warp (a warp owns 16 * MT rows; more rows reuse each K/V
//             fragment read from shared memory more times, at the cost of accumulator registers)
//   WARPS     warps per block; the block's query tile is BM = 16 * MT * WARPS rows
//   BN        keys per K/V tile
//   Q_IN_REGS keep the warp's Q fragments in registers (MT * D / 4 of them) instead of re-reading
//             shared memory for every K/V tile
//   Rows      RaggedRows<T> or PagedRows<T>: key position -> slot, and the Params type

template <typename T, int D, int MT, int WARPS, int BN, bool Q_IN_REGS, typename Rows>
__global__ void __launch_bounds__(WARPS * 32, 1) prefill_kernel(const typename Rows::Params p) {
  constexpr int BM = 16 * MT * WARPS;
  constexpr int kThreads = WARPS * 32;
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static_assert(BN % 16 == 0 && D % 16 == 0, "mma tiles are 16 wide");
  static_assert((BN * kChunks) % kThreads == 0 && (BM * kChunks) % kThreads == 0, "even tile loads");
  static_assert(BN <= kThreads, "one thread per key fills the slot table");
  using E = Elem<T>;

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sQ = smem_addr(smem);
  constexpr uint32_t kTileBytes = BN * D * 2;
  const uint32_t sK = sQ + BM * D * 2;  // K(t) lives at sK + (t & 1) * kTileBytes
  const uint32_t sV = sK + 2 * kTileBytes;  // likewise V(t)
  // Slots of the keys of two consecutive tiles (Rows::kSlotTable only): a paged lookup is a
  // dependent global load, so page ids are fetched two tiles ahead, off the path of the cp.async
  // that needs them.
  int* slot_tab = reinterpret_cast<int*>(smem + (BM + 4 * BN) * D * 2);

  const int h = blockIdx.x;
  const int b = blockIdx.y;
  // Heaviest causal tiles (the last queries) first, so the tail of the grid is short work.
  const int q0 = (gridDim.z - 1 - blockIdx.z) * BM;
  const int q_start = p.cu_seqlens_q[b];
  const int sq = p.cu_seqlens_q[b + 1] - q_start;
  if (q0 >= sq) return;

  const int num_heads = p.shape.num_q_heads;
  const int num_kv_heads = p.shape.num_kv_heads;
  const Rows rows(p, b);
  const int sk = rows.len;
  const int64_t kv_stride = static_cast<int64_t>(num_kv_heads) * D;
  const int64_t kv_head = static_cast<int64_t>(h / (num_heads / num_kv_heads)) * D;
  const bool causal = p.mask.causal;
  const int window = p.mask.window_left;
  // The binding guarantees scale > 0 and finite: the max of the raw logits then scales to the max
  // of the scaled ones, so the scale folds into the one FFMA before each exp2.
  const float scale_log2 = p.mask.scale * kLog2e;

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;  // row within the mma fragment (and g + 8)
  const int tq = lane & 3;  // column pair within the fragment

  // Positions (in key coordinates) of this tile's first and last real query.
  const int pos_lo = sk - sq + q0;
  const int pos_hi = sk - sq + min(q0 + BM, sq) - 1;
  const int key_hi = causal ? min(sk - 1, pos_hi) : sk - 1;
  const int key_lo = window >= 0 ? max(0, pos_lo - window) : 0;
  const int t_begin = key_lo / BN;
  const int t_end = key_hi >= key_lo ? key_hi / BN : t_begin - 1;

  const T* q = static_cast<const T*>(p.q);
  const int64_t q_row_stride = static_cast<int64_t>(num_heads) * D;

  auto load_kv = [&](uint32_t dst, const T* base, int t) {
    const int* tab = slot_tab + (t & 1) * BN;
#pragma unroll
    for (int it = 0; it < BN * kChunks / kThreads; ++it) {
      const int i = tid + it * kThreads;
      const int r = i / kChunks, c = i % kChunks;
      const bool ok = t * BN + r < sk;
      int slot;
      if constexpr (Rows::kSlotTable) {
        slot = tab[r];
      } else {
        slot = rows.slot(t * BN + r);
      }
      cp_async_16(dst + swz<D>(r, c), base + (ok ? slot * kv_stride + kv_head + c * 8 : 0), ok);
    }
  };

  float o[MT][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
  float m[MT][2];  // running max of the log2-scaled logits of rows g and g + 8 of each slice
  float l[MT][2];  // this thread's share of the running denominators
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) m[mt][0] = m[mt][1] = -INFINITY, l[mt][0] = l[mt][1] = 0.f;

  if (t_end >= t_begin) {
#pragma unroll
    for (int it = 0; it < BM * kChunks / kThreads; ++it) {
      const int i = tid + it * kThreads;
      const int r = i / kChunks, c = i % kChunks;
      const bool ok = q0 + r < sq;
      const T* src = q + (ok ? (q_start + q0 + r) * q_row_stride + h * D + c * 8 : 0);
      cp_async_16(sQ + swz<D>(r, c), src, ok);
    }
    if constexpr (Rows::kSlotTable) {
      if (tid < BN) {
        const int j = t_end * BN + tid;
        slot_tab[(t_end & 1) * BN + tid] = j < sk ? rows.slot(j) : 0;
        if (t_end > t_begin) slot_tab[((t_end - 1) & 1) * BN + tid] = rows.slot(j - BN);
      }
      __syncthreads();
    }
    load_kv(sK + (t_end & 1) * kTileBytes, rows.k, t_end);
    load_kv(sV + (t_end & 1) * kTileBytes, rows.v, t_end);
    cp_async_commit();  // with Q
  }

  uint32_t qf[Q_IN_REGS ? MT : 1][Q_IN_REGS ? D / 16 : 1][4];
  const int warp_row = warp * 16 * MT;  // this warp's first row within the block's tile

  // Last tile first: the tiles that need masking (causal diagonal, partial end) come first, when
  // the running max is still being established. Each iteration commits one cp.async group (K and
  // V of the next tile, empty after the last), so at the top of iteration t only K(t), V(t) are in
  // flight; they had the whole previous iteration to land.
  for (int t = t_end; t >= t_begin; --t) {
    const int n0 = t * BN;
    const uint32_t k_tile = sK + (t & 1) * kTileBytes;
    const uint32_t v_tile = sV + (t & 1) * kTileBytes;
    cp_async_wait<0>();
    __syncthreads();  // K(t), V(t) have landed, and every warp is done with K(t+1), V(t+1)
    if (t > t_begin) {
      load_kv(sK + ((t - 1) & 1) * kTileBytes, rows.k, t - 1);
      load_kv(sV + ((t - 1) & 1) * kTileBytes, rows.v, t - 1);
    }
    cp_async_commit();
    int next_slot = 0;
    if (Rows::kSlotTable && t - 1 > t_begin && tid < BN) next_slot = rows.slot(n0 - 2 * BN + tid);  // < sk

    if constexpr (Q_IN_REGS) {
      if (t == t_end) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int kk = 0; kk < D / 16; ++kk)
            ldmatrix_x4(qf[mt][kk], sQ + swz<D>(warp_row + mt * 16 + (lane & 15), kk * 2 + (lane >> 4)));
      }
    }

    // A warp none of whose rows sees a key of this tile (above the causal diagonal, left of the
    // window, or past the last query) skips it: its P would be all zeros, leaving m, l and O as
    // they are. Warp-uniform, and no barrier inside, so the other warps run on meanwhile.
    const int w_lo = pos_lo + warp_row;  // positions of the warp's first and last real rows
    const int w_hi = min(w_lo + 16 * MT - 1, pos_hi);
    const bool live =
        w_lo <= w_hi && (!causal || n0 <= w_hi) && (window < 0 || n0 + BN - 1 >= w_lo - window);
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
            ldmatrix_x4(a[mt], sQ + swz<D>(warp_row + mt * 16 + (lane & 15), kk * 2 + (lane >> 4)));
          }
        }
#pragma unroll
        for (int nn = 0; nn < BN / 16; ++nn) {
          uint32_t bk[4];
          const int key = nn * 16 + (lane & 7) + ((lane >> 4) << 3);
          ldmatrix_x4(bk, k_tile + swz<D>(key, kk * 2 + ((lane >> 3) & 1)));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            E::mma(s[mt][2 * nn], a[mt], bk[0], bk[1]);
            E::mma(s[mt][2 * nn + 1], a[mt], bk[2], bk[3]);
          }
        }
      }

      // Masks are uniform per tile: decide once whether any key of this tile can be out of range.
      // (Deciding per warp is finer but measured slower: it costs registers in the hot loop.)
      const bool need_mask = (n0 + BN > sk) || (causal && n0 + BN - 1 > pos_lo) ||
                             (window >= 0 && n0 < pos_hi - window);
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
          ldmatrix_x4_trans(bv, v_tile + swz<D>(key, nn * 2 + (lane >> 4)));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            E::mma(o[mt][2 * nn], pf[mt][kk], bv[0], bv[1]);
            E::mma(o[mt][2 * nn + 1], pf[mt][kk], bv[2], bv[3]);
          }
        }
      }
    }

    // Tile t - 2 reuses tile t's half of the table, last read to issue K(t), V(t) before this
    // iteration's barrier; the next iteration's barrier publishes it before K(t-2) is issued.
    if (Rows::kSlotTable && t - 1 > t_begin && tid < BN) slot_tab[(t & 1) * BN + tid] = next_slot;
  }

  // Epilogue: finish the denominators, normalise, and write through this warp's own Q rows in
  // shared memory (only this warp ever read them) so that global stores are 16 bytes wide.
  __syncwarp();
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int slice = warp_row + mt * 16;  // first row of this slice within the block's tile
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l[mt][r] += __shfl_xor_sync(0xffffffffu, l[mt][r], 1);
      l[mt][r] += __shfl_xor_sync(0xffffffffu, l[mt][r], 2);
      inv[r] = l[mt][r] > 0.f ? 1.f / l[mt][r] : 0.f;
      const int i = q0 + slice + g + 8 * r;
      if (p.lse != nullptr && tq == 0 && i < sq) {
        p.lse[static_cast<int64_t>(q_start + i) * num_heads + h] =
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
    const int row = q0 + warp_row + r;
    if (row < sq) {
      const uint4 v = *reinterpret_cast<const uint4*>(smem + swz<D>(warp_row + r, c));
      *reinterpret_cast<uint4*>(out + (q_start + row) * q_row_stride + h * D + c * 8) = v;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tile shapes per head dim (the one place to tune; fields as in the kernel's parameter list).
// Chosen by measurement on an H100 (bf16, H=32, Hkv=8, causal): for D=128, 32 rows per warp
// (MT=2) beat 16 by ~8% at long sequences because each ldmatrix of K/V feeds twice the mma work,
// even though the compiler spills a few registers; the shared-memory sizes also fit the 99 KB
// per-block limit of sm_86/sm_89.
template <int D>
struct Tiles;
template <> struct Tiles<64> { static constexpr int MT = 2, WARPS = 4, BN = 64; static constexpr bool Q_IN_REGS = true; };
template <> struct Tiles<128> { static constexpr int MT = 2, WARPS = 4, BN = 64; static constexpr bool Q_IN_REGS = false; };
template <> struct Tiles<256> { static constexpr int MT = 1, WARPS = 4, BN = 32; static constexpr bool Q_IN_REGS = false; };

template <typename T, int D, typename Rows>
void launch(const typename Rows::Params& p, cudaStream_t stream) {
  using C = Tiles<D>;
  constexpr int BM = 16 * C::MT * C::WARPS;
  auto kernel = prefill_kernel<T, D, C::MT, C::WARPS, C::BN, C::Q_IN_REGS, Rows>;
  const int smem = (BM + 4 * C::BN) * D * 2 + 2 * C::BN * 4;
  if (smem > 48 * 1024) {
    KV_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  }
  // The grid covers the longest query run; the host copy of cu_seqlens_q is authoritative.
  int max_q = p.max_seqlen_q;
  if (p.cu_seqlens_q_host != nullptr) {
    max_q = 0;
    for (int b = 0; b < p.batch; ++b) max_q = std::max(max_q, p.cu_seqlens_q_host[b + 1] - p.cu_seqlens_q_host[b]);
  }
  if (max_q <= 0 || p.batch <= 0) return;
  const dim3 grid(p.shape.num_q_heads, p.batch, (max_q + BM - 1) / BM);
  kernel<<<grid, C::WARPS * 32, smem, stream>>>(p);
  check_launch("prefill_kernel");
}

// The single dispatch point: dtype x head dim, for either K/V layout.
template <template <typename> class Rows, typename Params>
void dispatch(const Params& p, cudaStream_t stream) {
  const int d = p.shape.head_dim;
  if (p.dtype == DType::BF16) {
    if (d == 64) return launch<__nv_bfloat16, 64, Rows<__nv_bfloat16>>(p, stream);
    if (d == 128) return launch<__nv_bfloat16, 128, Rows<__nv_bfloat16>>(p, stream);
    if (d == 256) return launch<__nv_bfloat16, 256, Rows<__nv_bfloat16>>(p, stream);
  } else if (p.dtype == DType::F16) {
    if (d == 64) return launch<__half, 64, Rows<__half>>(p, stream);
    if (d == 128) return launch<__half, 128, Rows<__half>>(p, stream);
    if (d == 256) return launch<__half, 256, Rows<__half>>(p, stream);
  } else {
    fail(ErrorCode::Dtype, "prefill supports f16 and bf16, not ", dtype_name(p.dtype));
  }
  fail(ErrorCode::Unsupported, "prefill supports head_dim 64, 128 and 256, not ", d);
}

}  // namespace

// The one place that picks a prefill path: the wgmma kernel where the device and the build have
// it and it covers the shape, else this file's mma.sync kernel.
void launch_prefill(const PrefillParams& p, cudaStream_t stream) {
  if (prefill_sm90_fits(p)) return launch_prefill_sm90(p, stream);
  dispatch<RaggedRows>(p, stream);
}

void launch_paged_prefill(const PagedPrefillParams& p, cudaStream_t stream) { dispatch<PagedRows>(p, stream); }

}  // namespace kvflash::cuda
