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
// warps drift apart and one warp's softmax overlaps another's mma. What a block does with a tile in
// shared memory (and the epilogue) lives in prefill_tile.cuh, shared with prefill_quant.cu.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "prefill.h"
#include "prefill_sm90.h"
#include "prefill_tile.cuh"

namespace kvflash::cuda {
namespace {

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
  static_assert((BN * kChunks) % kThreads == 0, "even tile loads");
  static_assert(BN <= kThreads, "one thread per key fills the slot table");

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
  const QueryTile qt = query_tile<BM, BN>(q_start, q0, sq, sk, p.mask);
  const int t_begin = qt.t_begin, t_end = qt.t_end;
  const int tid = threadIdx.x;

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
      cp_async16(dst + swz<D>(r, c), base + (ok ? slot * kv_stride + kv_head + c * 8 : 0), ok);
    }
  };

  float o[MT][D / 8][4], m[MT][2], l[MT][2];
  init_rows<D, MT>(o, m, l);

  if (t_end >= t_begin) {
    load_query_tile<T, D, BM, kThreads>(sQ, p.q, qt, h, num_heads);
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
  const int warp_row = (tid >> 5) * 16 * MT;  // this warp's first row within the block's tile

  // Last tile first: the tiles that need masking (causal diagonal, partial end) come first, when
  // the running max is still being established. Each iteration commits one cp.async group (K and
  // V of the next tile, empty after the last), so at the top of iteration t only K(t), V(t) are in
  // flight; they had the whole previous iteration to land.
  for (int t = t_end; t >= t_begin; --t) {
    const int n0 = t * BN;
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
      if (t == t_end) load_q_fragments<D, MT>(qf, sQ, warp_row);
    }
    attend_tile<T, D, MT, BN, Q_IN_REGS>(qt, sQ, qf, sK + (t & 1) * kTileBytes, sV + (t & 1) * kTileBytes, n0,
                                         warp_row, o, m, l);

    // Tile t - 2 reuses tile t's half of the table, last read to issue K(t), V(t) before this
    // iteration's barrier; the next iteration's barrier publishes it before K(t-2) is issued.
    if (Rows::kSlotTable && t - 1 > t_begin && tid < BN) slot_tab[(t & 1) * BN + tid] = next_slot;
  }

  store_rows<T, D, MT>(qt, smem, p.out, p.lse, h, num_heads, warp_row, o, m, l);
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
