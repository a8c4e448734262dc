// Paged prefill over a quantized layer (formats in native/core/quant_format.h): prefill.cu's
// FlashAttention-2 kernel (prefill_tile.cuh: mma.sync m16n8k16, online softmax in f32) with a
// different way for a K/V tile to reach shared memory. The codes and statistics of the tile's
// quantized rows stream in by cp.async while the block works on the previous tile (D*bits/8 bytes a
// row instead of 2D), then the block dequantizes them into the element-type K and V tiles the mma
// reads: each element is fma(code, scale, min) (fp8: code * scale) in f32, rounded once to the element
// type, exactly as dequantizePages writes it, so the tiles hold what paged prefill over
// dequantizePages' output would read. Rows of the last page come from the full-precision tail pool,
// rows past the sequence are zeros. Nothing bigger than one tile is ever dequantized.
//
// Per K/V tile t (last first, as in prefill.cu): barrier (tile t's staging has landed; every warp is
// done with the K and V tiles), dequantize tile t, barrier, issue tile t-1's staging, then each warp's
// attend_tile on tile t while it streams in.
//
// Statistics are staged as the aligned 16-byte blocks (8 f16) that hold them: a row's value scale and
// min blocks (fp8: the page's K and V scale blocks), and for pages of 16 or more rows each 16-row
// group's key scales and mins; smaller pages read key statistics from global memory. Tensors are
// whole 512-byte granules of the caching allocator (allocator.cpp), so such a block never leaves its
// tensor's allocation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "prefill_tile.cuh"
#include "quant.h"
#include "quant_codes.cuh"

namespace kvflash::cuda {
namespace {

// Tile shapes per head dim: those of prefill.cu (the per-tile work is the same); with the staging
// they fit the 99 KB per block of sm_86/sm_89.
template <int D>
struct QuantTiles;
template <> struct QuantTiles<64> { static constexpr int MT = 2, WARPS = 4, BN = 64; static constexpr bool Q_IN_REGS = true; };
template <> struct QuantTiles<128> { static constexpr int MT = 2, WARPS = 4, BN = 64; static constexpr bool Q_IN_REGS = false; };
template <> struct QuantTiles<256> { static constexpr int MT = 1, WARPS = 4, BN = 32; static constexpr bool Q_IN_REGS = false; };

// Shared memory of the kernel (byte offsets): Q [BM][D], K and V [BN][D] of the element type, then one
// tile's staging: K and V codes [BN][ROWB], row statistics [BN][2][8] f16 (integer formats: the blocks
// holding the row's value scales and mins; fp8: its page's K and V scales), key statistics [BN/16][2][D]
// f16 (integer formats, pages of 16 rows or more: each 16-row group's key scales and mins), and last
// the page of each row of two tiles.
template <int D, int BITS>
struct QuantLayout {
  using C = QuantTiles<D>;
  static constexpr int BM = 16 * C::MT * C::WARPS, BN = C::BN;
  static constexpr int B = BITS == 0 ? 8 : BITS;  // bits per code
  static constexpr int ROWB = D * B / 8;          // code bytes of one row (>= 16)
  static constexpr int K_TILE = BM * D * 2;
  static constexpr int V_TILE = K_TILE + BN * D * 2;
  static constexpr int K_CODES = V_TILE + BN * D * 2;
  static constexpr int V_CODES = K_CODES + BN * ROWB;
  static constexpr int ROW_STATS = V_CODES + BN * ROWB;
  static constexpr int KEY_STATS = ROW_STATS + BN * 32;
  static constexpr int PAGES = KEY_STATS + (BITS == 0 ? 0 : BN / 16 * 4 * D);
  static constexpr int SMEM = PAGES + 2 * BN * 4;
};

// Eight consecutive channels c8 .. c8 + 7 of one row as the element type, packed for a 16-byte store.
template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&x)[8]) {
  return make_uint4(Elem<T>::pack(x[0], x[1]), Elem<T>::pack(x[2], x[3]), Elem<T>::pack(x[4], x[5]),
                    Elem<T>::pack(x[6], x[7]));
}

// The 8 codes of channels c8 .. c8 + 7 from a staged code row (LSB first; BITS = 0: fp8, a byte each).
template <int BITS>
__device__ __forceinline__ void load_codes8(const unsigned char* row, int c8, uint32_t (&code)[8]) {
  constexpr int B = BITS == 0 ? 8 : BITS;
  uint64_t w;
  if constexpr (B == 8) {
    const uint2 v = *reinterpret_cast<const uint2*>(row + c8);
    w = v.x | (uint64_t(v.y) << 32);
  } else if constexpr (B == 4) {
    w = *reinterpret_cast<const uint32_t*>(row + c8 / 2);
  } else {
    w = *reinterpret_cast<const uint16_t*>(row + c8 / 4);
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) code[i] = static_cast<uint32_t>(w >> (i * B)) & ((1u << B) - 1u);
}

// T: element type of q, out and the tail pool. D: head dim. BITS: 8, 4, 2 (KIVI integer formats) or
// 0 (fp8e4m3). MT, WARPS, BN, Q_IN_REGS as in prefill.cu's kernel.
template <typename T, int D, int BITS, int MT, int WARPS, int BN, bool Q_IN_REGS>
__global__ void __launch_bounds__(WARPS * 32, 1) quant_prefill_kernel(const QuantPrefillParams p) {
  using L = QuantLayout<D, BITS>;
  constexpr int BM = 16 * MT * WARPS;
  constexpr int kThreads = WARPS * 32;
  constexpr int kChunks = D / 8;  // 8-channel (16-byte) chunks of an element-type row
  constexpr int ROWB = L::ROWB;
  constexpr int CPR = ROWB / 16;  // 16-byte chunks of a code row
  static_assert(BN % 16 == 0 && kThreads % kChunks == 0 && (BN * kChunks) % kThreads == 0 && 2 * BN <= kThreads,
                "tile loads");
  static_assert(ROWB % 16 == 0, "code rows of whole 16-byte chunks");

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sQ = smem_addr(smem);
  int* row_page = reinterpret_cast<int*>(smem + L::PAGES);  // [2][BN]: tile t's rows at (t & 1) * BN
  const __half* row_stats = reinterpret_cast<const __half*>(smem + L::ROW_STATS);

  const int h = blockIdx.x;
  const int b = blockIdx.y;
  const int q0 = (gridDim.z - 1 - blockIdx.z) * BM;  // heaviest causal tiles first
  const int q_start = p.cu_seqlens_q[b];
  const int sq = p.cu_seqlens_q[b + 1] - q_start;
  if (q0 >= sq) return;

  const int num_heads = p.shape.num_q_heads;
  const int hk = h / (num_heads / p.shape.num_kv_heads);
  const int64_t hkv = p.shape.num_kv_heads;
  const int log2_page = __ffs(p.kv.page_size) - 1;
  const int page_mask = p.kv.page_size - 1;
  const bool key_slots = BITS != 0 && p.kv.page_size >= 16;  // 16-row groups lie within one page
  const int32_t* pages = p.kv.indices + p.kv.indptr[b];
  const int npages = p.kv.indptr[b + 1] - p.kv.indptr[b];
  const int qlen = (npages - 1) << log2_page;  // quantized rows; the tail page holds the rest
  const int sk = qlen + p.kv.last_page_len[b];
  const QueryTile qt = query_tile<BM, BN>(q_start, q0, sq, sk, p.mask);
  const int t_begin = qt.t_begin, t_end = qt.t_end;
  const int tid = threadIdx.x;
  const QuantizedPages& qp = p.quant;
  const int ng = BITS == 0 ? 1 : qp.groups();
  const __half* k_scale = reinterpret_cast<const __half*>(qp.k_scale);
  const __half* k_min = reinterpret_cast<const __half*>(qp.k_min);
  const __half* v_scale = reinterpret_cast<const __half*>(qp.v_scale);
  const __half* v_min = reinterpret_cast<const __half*>(qp.v_min);

  // The page of row r of tile t, for the table row_page; rows past the quantized ones are never read.
  auto page_of = [&](int t, int r) { return t * BN + r < qlen ? pages[(t * BN + r) >> log2_page] : 0; };
  // Where the statistics block of row j (in page `page`) starts, and the row's place in it: integer
  // formats, the row's first value group; fp8, its page's (K or V) scale.
  auto row_stat = [&](int64_t page, int j, int* pick) {
    const int64_t e = BITS == 0 ? page * hkv + hk : (((page << log2_page) | (j & page_mask)) * hkv + hk) * ng;
    *pick = static_cast<int>(e & 7);
    return e & ~int64_t(7);
  };
  // Tile t's staging: codes, row statistics and key statistics of its quantized rows.
  auto issue = [&](int t) {
    const int* tab = row_page + (t & 1) * BN;
    for (int i = tid; i < BN * CPR; i += kThreads) {
      const int r = i / CPR, c = i % CPR;
      const int j = t * BN + r;
      const bool ok = j < qlen;
      const int64_t off = ok ? (((int64_t(tab[r]) << log2_page) | (j & page_mask)) * hkv + hk) * ROWB + c * 16 : 0;
      cp_async16(smem_addr(smem + L::K_CODES + r * ROWB + c * 16), static_cast<const uint8_t*>(qp.k_codes) + off, ok);
      cp_async16(smem_addr(smem + L::V_CODES + r * ROWB + c * 16), static_cast<const uint8_t*>(qp.v_codes) + off, ok);
    }
    if (tid < 2 * BN) {
      const int r = tid >> 1, which = tid & 1;  // which: 0 the scales, 1 the mins (fp8: 0 K, 1 V)
      const int j = t * BN + r;
      const bool ok = j < qlen;
      int pick;
      const int64_t at = ok ? row_stat(tab[r], j, &pick) : 0;
      const __half* src = BITS == 0 ? (which ? v_scale : k_scale) : (which ? v_min : v_scale);
      cp_async16(smem_addr(smem + L::ROW_STATS + tid * 16), src + at, ok);
    }
    if (key_slots) {
      constexpr int SC = D / 8;  // 16-byte chunks of one statistic row
      for (int i = tid; i < BN / 16 * 2 * SC; i += kThreads) {
        const int slot = i / (2 * SC), c = i % (2 * SC);
        const int j = t * BN + slot * 16;
        const bool ok = j < qlen;
        const int64_t at = ok ? (tab[slot * 16] * hkv + hk) * D : 0;
        const __half* src = c < SC ? k_scale + at + c * 8 : k_min + at + (c - SC) * 8;
        cp_async16(smem_addr(smem + L::KEY_STATS + slot * 4 * D + c * 16), src, ok);
      }
    }
  };
  // Tile t's K and V rows, in the element type, into the shared K and V tiles.
  auto dequantize = [&](int t) {
    const int* tab = row_page + (t & 1) * BN;
    const int64_t tail_page = pages[npages - 1];
    const int c = tid % kChunks;  // the thread's channels c * 8 .. c * 8 + 7, in every row it converts
    const int vgroup = BITS == 0 ? 0 : c * 8 / qp.group_size;
    int held = -1;  // the page whose key statistics ks, km hold (integer formats, pages under 16 rows)
    float ks[8], km[8];
#pragma unroll 1
    for (int it = 0; it < BN * kChunks / kThreads; ++it) {
      const int r = tid / kChunks + it * (kThreads / kChunks);
      const int j = t * BN + r;
      uint4 kw = make_uint4(0, 0, 0, 0), vw = kw;  // rows past the sequence: zeros
      if (j >= qlen && j < sk) {
        const int64_t row = (((tail_page << log2_page) | (j - qlen)) * hkv + hk) * D + c * 8;
        kw = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.kv.k_pages) + row);
        vw = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.kv.v_pages) + row);
      } else if (j < qlen) {
        const int64_t page = tab[r];
        int pick;
        row_stat(page, j, &pick);
        const float s0 = __half2float(row_stats[r * 16 + pick + vgroup]);
        const float s1 = __half2float(row_stats[r * 16 + 8 + pick + vgroup]);
        uint32_t kc[8], vc[8];
        load_codes8<BITS>(smem + L::K_CODES + r * ROWB, c * 8, kc);
        load_codes8<BITS>(smem + L::V_CODES + r * ROWB, c * 8, vc);
        float k[8], v[8];
        if constexpr (BITS == 0) {  // s0, s1: the K and V scales
#pragma unroll
          for (int x = 0; x < 8; x += 2) {
            const float2 kf = fp8x2_to_float(kc[x] | (kc[x + 1] << 8));
            const float2 vf = fp8x2_to_float(vc[x] | (vc[x + 1] << 8));
            k[x] = kf.x * s0, k[x + 1] = kf.y * s0;
            v[x] = vf.x * s1, v[x + 1] = vf.y * s1;
          }
        } else {  // s0, s1: the value scale and min
          uint4 sw, mw;
          if (key_slots) {
            const unsigned char* slot = smem + L::KEY_STATS + (r / 16) * 4 * D;
            sw = *reinterpret_cast<const uint4*>(slot + c * 16);
            mw = *reinterpret_cast<const uint4*>(slot + 2 * D + c * 16);
          } else if (page != held) {
            const int64_t at = (page * hkv + hk) * D + c * 8;
            sw = *reinterpret_cast<const uint4*>(k_scale + at);
            mw = *reinterpret_cast<const uint4*>(k_min + at);
          }
          if (key_slots || page != held) {
            held = static_cast<int>(page);
            const uint32_t s4[4] = {sw.x, sw.y, sw.z, sw.w}, m4[4] = {mw.x, mw.y, mw.z, mw.w};
#pragma unroll
            for (int x = 0; x < 4; ++x) {
              const float2 sf = f16x2_to_float(s4[x]), mf = f16x2_to_float(m4[x]);
              ks[2 * x] = sf.x, ks[2 * x + 1] = sf.y, km[2 * x] = mf.x, km[2 * x + 1] = mf.y;
            }
          }
#pragma unroll
          for (int x = 0; x < 8; ++x) {
            k[x] = fmaf(code_to_float(kc[x]), ks[x], km[x]);
            v[x] = fmaf(code_to_float(vc[x]), s0, s1);
          }
        }
        kw = pack8<T>(k);
        vw = pack8<T>(v);
      }
      *reinterpret_cast<uint4*>(smem + L::K_TILE + swz<D>(r, c)) = kw;
      *reinterpret_cast<uint4*>(smem + L::V_TILE + swz<D>(r, c)) = vw;
    }
  };

  float o[MT][D / 8][4], m[MT][2], l[MT][2];
  init_rows<D, MT>(o, m, l);

  if (t_end >= t_begin) {
    load_query_tile<T, D, BM, kThreads>(sQ, p.q, qt, h, num_heads);
    if (tid < BN) {
      row_page[(t_end & 1) * BN + tid] = page_of(t_end, tid);
      if (t_end > t_begin) row_page[((t_end - 1) & 1) * BN + tid] = page_of(t_end - 1, tid);
    }
    __syncthreads();
    issue(t_end);
    cp_async_commit();  // with Q
  }

  uint32_t qf[Q_IN_REGS ? MT : 1][Q_IN_REGS ? D / 16 : 1][4];
  const int warp_row = (tid >> 5) * 16 * MT;

  for (int t = t_end; t >= t_begin; --t) {
    // Pages of tile t - 2 go where tile t's were, once its dequantization is done; fetched now.
    const bool refill = t - 2 >= t_begin && tid < BN;
    const int next_page = refill ? page_of(t - 2, tid) : 0;
    cp_async_wait<0>();
    __syncthreads();  // tile t's staging has landed, and every warp is done with the K and V tiles
    dequantize(t);
    __syncthreads();  // the K and V tiles are complete, and the staging is free
    if (t > t_begin) issue(t - 1);
    cp_async_commit();
    if (refill) row_page[(t & 1) * BN + tid] = next_page;

    if constexpr (Q_IN_REGS) {
      if (t == t_end) load_q_fragments<D, MT>(qf, sQ, warp_row);
    }
    attend_tile<T, D, MT, BN, Q_IN_REGS>(qt, sQ, qf, sQ + L::K_TILE, sQ + L::V_TILE, t * BN, warp_row, o, m, l);
  }

  store_rows<T, D, MT>(qt, smem, p.out, p.lse, h, num_heads, warp_row, o, m, l);
}

template <typename T, int D, int BITS>
void launch(const QuantPrefillParams& p, cudaStream_t stream) {
  using C = QuantTiles<D>;
  constexpr int BM = 16 * C::MT * C::WARPS;
  auto kernel = quant_prefill_kernel<T, D, BITS, C::MT, C::WARPS, C::BN, C::Q_IN_REGS>;
  constexpr int smem = QuantLayout<D, BITS>::SMEM;
  if (smem > 48 * 1024) KV_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid(p.shape.num_q_heads, p.batch, (p.max_seqlen_q + BM - 1) / BM);
  kernel<<<grid, C::WARPS * 32, smem, stream>>>(p);
  check_launch("quant_prefill_kernel");
}

template <typename T, int D>
void dispatch_format(const QuantPrefillParams& p, cudaStream_t stream) {
  switch (p.quant.format) {
    case QuantFormat::FP8E4M3: return launch<T, D, 0>(p, stream);
    case QuantFormat::INT8: return launch<T, D, 8>(p, stream);
    case QuantFormat::INT4: return launch<T, D, 4>(p, stream);
    case QuantFormat::INT2: return launch<T, D, 2>(p, stream);
  }
  fail(ErrorCode::Unsupported, "unknown quantized format");
}

template <typename T>
void dispatch_dim(const QuantPrefillParams& p, cudaStream_t stream) {
  switch (p.shape.head_dim) {
    case 64: return dispatch_format<T, 64>(p, stream);
    case 128: return dispatch_format<T, 128>(p, stream);
    case 256: return dispatch_format<T, 256>(p, stream);
  }
  fail(ErrorCode::Unsupported, "quantized prefill supports head_dim 64, 128 and 256, not ", p.shape.head_dim);
}

}  // namespace

void launch_quantized_paged_prefill(const QuantPrefillParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.max_seqlen_q == 0) return;
  if (p.dtype == DType::BF16) return dispatch_dim<__nv_bfloat16>(p, stream);
  if (p.dtype == DType::F16) return dispatch_dim<__half>(p, stream);
  fail(ErrorCode::Dtype, "quantized prefill supports f16 and bf16, not ", dtype_name(p.dtype));
}

}  // namespace kvflash::cuda
