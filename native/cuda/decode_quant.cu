// Paged flash-decoding over a quantized layer (formats in native/core/quant_format.h). Codes and
// scales are read straight from the quantized pages and dequantized in registers; the last page of
// each sequence comes from the full-precision tail pool. Nothing is dequantized to memory.
//
// The main kernel (page sizes that are multiples of 16) follows decode.cu: a block per (sequence,
// KV head, split) serving the GQA group's heads as the rows of m16n8k16 tensor-core tiles, a
// cp.async ring of code and statistic tiles (~4 KB of key codes a tile, the ring as deep as ~60-72
// KB of shared memory allows), and split-K merged by log-sum-exp (decode_common.cuh). Operand
// fragments are dequantized from shared memory straight into f16 registers: codes become f16
// integers under the exponent of 1024 (no int-to-float unit), then one f16 fma applies scale and
// min. Smaller pages take a simpler CUDA-core kernel.
#include <cuda_fp8.h>

#include "decode_common.cuh"
#include "quant.h"
#include "quant_codes.cuh"
#include "scalar.cuh"

namespace kvflash::cuda {
namespace {

constexpr int kHeads = 8;  // query heads per block of the small-page kernel

struct QuantDecodeArgs {
  const void* q;
  void* out;
  float* lse;
  float* part_out;  // [B*H, splits, D]
  float* part_lse;  // [B*H, splits], log2 domain
  const uint8_t* k_codes;
  const uint8_t* v_codes;
  const __half* k_scale;
  const __half* k_min;
  const __half* v_scale;
  const __half* v_min;
  const void* k_tail;
  const void* v_tail;
  const int32_t* indptr;
  const int32_t* indices;
  const int32_t* last_page_len;
  int num_heads, num_kv_heads, group, head_chunks, log2_page, num_splits;
  int pages_per_split;  // small-page kernel only (the main kernel derives whole tiles per split)
  int value_groups, log2_group;
  float scale_log2;
};

// NB bytes (1, 2, 4, 8 or 16) at an NB-aligned address, as 64 bits (the first 8 bytes) + 64 more.
template <int NB>
__device__ __forceinline__ void load_bytes(const void* p, uint64_t& lo, uint64_t& hi) {
  hi = 0;
  if constexpr (NB == 1) lo = __ldg(static_cast<const uint8_t*>(p));
  else if constexpr (NB == 2) lo = __ldg(static_cast<const uint16_t*>(p));
  else if constexpr (NB == 4) lo = __ldg(static_cast<const uint32_t*>(p));
  else if constexpr (NB == 8) lo = __ldg(static_cast<const unsigned long long*>(p));
  else {
    static_assert(NB == 16, "loads of 1 to 16 bytes");
    const uint4 v = __ldg(static_cast<const uint4*>(p));
    lo = (uint64_t(v.y) << 32) | v.x;
    hi = (uint64_t(v.w) << 32) | v.z;
  }
}

// Lane's CH channels of a full-precision row (T elements) as floats.
template <typename T, int CH>
__device__ __forceinline__ void load_full(const T* row, float (&x)[CH]) {
  uint64_t w[2];
  load_bytes<CH * 2>(row, w[0], w[1]);
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    const uint16_t bits = static_cast<uint16_t>(w[c / 4] >> (16 * (c % 4)));
    x[c] = to_float(*reinterpret_cast<const T*>(&bits));
  }
}

// Lane's CH codes of a packed row (BITS per code, LSB first; BITS = 0 means fp8, 8 bits each).
template <int BITS, int CH>
__device__ __forceinline__ void load_codes(const uint8_t* row, int lane, uint32_t (&code)[CH]) {
  constexpr int B = BITS == 0 ? 8 : BITS;
  constexpr int LANE_BITS = CH * B;  // 4 .. 64
  constexpr int NB = LANE_BITS < 8 ? 1 : LANE_BITS / 8;
  const int bit0 = lane * LANE_BITS;
  uint64_t lo, hi;
  load_bytes<NB>(row + (bit0 >> 3), lo, hi);
  const int shift = bit0 & 7;  // non-zero only when a lane owns half a byte
#pragma unroll
  for (int c = 0; c < CH; ++c) code[c] = static_cast<uint32_t>(lo >> (shift + c * B)) & ((1u << B) - 1u);
}

// ---- the CUDA-core kernel for page sizes under 16 (no 16-token step within one page) ------------
//
// T: element type of q, out and the tail pool. D: head dimension. BITS: 8, 4, 2 (KIVI integer
// formats) or 0 (fp8e4m3 with a per-(page, head) scale).
//
// Splits are whole pages. A warp takes 32 consecutive tokens at a time. Scores: lane j computes q.k of token j for every
// head of the block, reading its own key row 16 bytes of codes at a time (so a warp max and one
// exp2 per token replace per-token reductions). Values: lanes own D/32 channels and walk the 32
// tokens, with the probabilities broadcast from shared memory four tokens per load.
template <typename T, int D, int BITS>
__global__ void __launch_bounds__(kThreads) quant_small_page_decode_kernel(const QuantDecodeArgs a) {
  constexpr int CH = D / 32;                    // value channels per lane
  constexpr int B = BITS == 0 ? 8 : BITS;       // bits per code
  constexpr int ROW_BYTES = D * B / 8;          // >= 16 for every D and format
  constexpr int UNIT_CH = 16 * 8 / B;           // key channels per 16-byte load of codes
  static_assert(ROW_BYTES % 16 == 0, "rows of whole 16-byte units");
  __shared__ __align__(16) float q_s[kHeads][D];
  __shared__ __align__(16) float o_s[kWarps][kHeads][D];
  __shared__ __align__(16) float p_s[kWarps][kHeads][32];
  __shared__ float m_s[kWarps][kHeads], l_s[kWarps][kHeads];
  wait_for_previous_grid();  // launched early (programmatic): nothing is read before this

  const int hk = blockIdx.x / a.head_chunks;
  const int head0 = (blockIdx.x % a.head_chunks) * kHeads;
  const int split = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int nheads = min(kHeads, a.group - head0);
  const int qh0 = hk * a.group + head0;

  for (int i = tid; i < kHeads * D; i += kThreads) {
    const int r = i / D, d = i % D;
    q_s[r][d] = r < nheads ? to_float(static_cast<const T*>(a.q)[(int64_t(b) * a.num_heads + qh0 + r) * D + d]) * a.scale_log2
                           : 0.f;
  }
  __syncthreads();

  const int page_begin = a.indptr[b];
  const int npages = a.indptr[b + 1] - page_begin;
  const int page_size = 1 << a.log2_page;
  const int len = (npages - 1) * page_size + a.last_page_len[b];
  const int start = split * a.pages_per_split * page_size;
  const int end = min(len, start + a.pages_per_split * page_size);
  const int tail_start = (npages - 1) * page_size;
  const T* k_tail = static_cast<const T*>(a.k_tail);
  const T* v_tail = static_cast<const T*>(a.v_tail);

  float m[kHeads], l[kHeads], acc[kHeads][CH], accm[kHeads];  // accm: sum of p * value min (lane's group)
#pragma unroll
  for (int h = 0; h < kHeads; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.f;
    accm[h] = 0.f;
#pragma unroll
    for (int c = 0; c < CH; ++c) acc[h][c] = 0.f;
  }
  const int c0 = lane * CH;

  for (int chunk = start + warp * 32; chunk < end; chunk += kWarps * 32) {
    const int nvalid = min(32, end - chunk);
    const int pos = chunk + min(lane, nvalid - 1);  // lanes past the end repeat the last token, masked below
    const int64_t page = __ldg(a.indices + page_begin + (pos >> a.log2_page));
    const int64_t r = (page * page_size + (pos & (page_size - 1))) * a.num_kv_heads + hk;
    const bool tail = pos >= tail_start;

    // ---- scores of this lane's token
    float s[kHeads];
#pragma unroll
    for (int h = 0; h < kHeads; ++h) s[h] = 0.f;
#pragma unroll 1
    for (int u = 0; u < D / UNIT_CH; ++u) {
      float k[UNIT_CH];
      if (tail) {
#pragma unroll
        for (int e = 0; e < UNIT_CH / 8; ++e) {
          float x8[8];
          load_full<T, 8>(k_tail + r * D + u * UNIT_CH + e * 8, x8);
#pragma unroll
          for (int i = 0; i < 8; ++i) k[e * 8 + i] = x8[i];
        }
      } else {
        const uint4 w4 = __ldg(reinterpret_cast<const uint4*>(a.k_codes + r * ROW_BYTES) + u);
        const uint32_t w[4] = {w4.x, w4.y, w4.z, w4.w};
        if constexpr (BITS == 0) {
          const float ks = __half2float(a.k_scale[page * a.num_kv_heads + hk]);
#pragma unroll
          for (int i = 0; i < UNIT_CH; i += 2) {
            const float2 x = fp8x2_to_float(w[i / 4] >> (8 * (i % 4)));
            k[i] = x.x * ks;
            k[i + 1] = x.y * ks;
          }
        } else {
          const int64_t stat = (page * a.num_kv_heads + hk) * D + u * UNIT_CH;
#pragma unroll
          for (int e = 0; e < UNIT_CH / 8; ++e) {
            const uint4 sc = __ldg(reinterpret_cast<const uint4*>(a.k_scale + stat) + e);
            const uint4 mn = __ldg(reinterpret_cast<const uint4*>(a.k_min + stat) + e);
            const uint32_t scw[4] = {sc.x, sc.y, sc.z, sc.w}, mnw[4] = {mn.x, mn.y, mn.z, mn.w};
#pragma unroll
            for (int i = 0; i < 8; i += 2) {
              const float2 sf = f16x2_to_float(scw[i / 2]), mf = f16x2_to_float(mnw[i / 2]);
#pragma unroll
              for (int i2 = 0; i2 < 2; ++i2) {
                const int ch = e * 8 + i + i2;  // channel within the unit
                const uint32_t code = (w[(ch * B) >> 5] >> ((ch * B) & 31)) & ((1u << B) - 1u);
                k[ch] = fmaf(code_to_float(code), i2 ? sf.y : sf.x, i2 ? mf.y : mf.x);
              }
            }
          }
        }
      }
#pragma unroll
      for (int h = 0; h < kHeads; ++h) {
        if (h >= nheads) break;  // block-uniform
        const float4* qv = reinterpret_cast<const float4*>(&q_s[h][u * UNIT_CH]);
#pragma unroll
        for (int i4 = 0; i4 < UNIT_CH / 4; ++i4) {
          const float4 qq = qv[i4];
          s[h] = fmaf(qq.x, k[i4 * 4], s[h]);
          s[h] = fmaf(qq.y, k[i4 * 4 + 1], s[h]);
          s[h] = fmaf(qq.z, k[i4 * 4 + 2], s[h]);
          s[h] = fmaf(qq.w, k[i4 * 4 + 3], s[h]);
        }
      }
    }

    // ---- online softmax over the chunk's tokens
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      if (h >= nheads) break;
      const float sh = lane < nvalid ? s[h] : -INFINITY;
      float cmax = sh;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) cmax = fmaxf(cmax, __shfl_xor_sync(0xffffffffu, cmax, o));
      const float mn = fmaxf(m[h], cmax);  // finite: lane 0 is always valid
      const float f = exp2f(m[h] - mn);
      const float p = exp2f(sh - mn);
      l[h] = l[h] * f + p;
      accm[h] *= f;
#pragma unroll
      for (int c = 0; c < CH; ++c) acc[h][c] *= f;
      m[h] = mn;
      p_s[warp][h][lane] = p;
    }
    __syncwarp();

    // ---- values: lane's channels of each of the chunk's tokens
    for (int j0 = 0; j0 < nvalid; j0 += 4) {
      float4 p4[kHeads];  // probabilities of tokens j0 .. j0 + 3 (0 past the chunk's end)
#pragma unroll
      for (int h = 0; h < kHeads; ++h) {
        if (h >= nheads) break;
        p4[h] = *reinterpret_cast<const float4*>(&p_s[warp][h][j0]);
      }
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const int j = j0 + jj;
        const int src = min(j, nvalid - 1);  // past the end: a real row, weighted 0
        const int64_t rj = __shfl_sync(0xffffffffu, r, src);
        float v[CH];
        float vscale = 1.f, vmin = 0.f;
        if (chunk + src >= tail_start) {
          load_full<T, CH>(v_tail + rj * D + c0, v);
        } else {
          uint32_t vc[CH];
          load_codes<BITS, CH>(a.v_codes + rj * ROW_BYTES, lane, vc);
          if constexpr (BITS == 0) {
            const int64_t pagej = (rj / a.num_kv_heads) >> a.log2_page;
            vscale = __half2float(a.v_scale[pagej * a.num_kv_heads + hk]);
#pragma unroll
            for (int c = 0; c < CH; c += 2) {
              const float2 x = fp8x2_to_float(vc[c] | (vc[c + 1] << 8));
              v[c] = x.x;
              v[c + 1] = x.y;
            }
          } else {
            const int64_t vs = rj * a.value_groups + (c0 >> a.log2_group);
            vscale = __half2float(a.v_scale[vs]);
            vmin = __half2float(a.v_min[vs]);
#pragma unroll
            for (int c = 0; c < CH; ++c) v[c] = code_to_float(vc[c]);
          }
        }
        // sum_j p_j (min_j + c_jd s_j) = sum_j (p_j s_j) c_jd + sum_j p_j min_j: the min once per token.
#pragma unroll
        for (int h = 0; h < kHeads; ++h) {
          if (h >= nheads) break;
          const float p = jj == 0 ? p4[h].x : jj == 1 ? p4[h].y : jj == 2 ? p4[h].z : p4[h].w;
          const float ps = p * vscale;
          accm[h] = fmaf(p, vmin, accm[h]);
#pragma unroll
          for (int c = 0; c < CH; ++c) acc[h][c] = fmaf(ps, v[c], acc[h][c]);
        }
      }
    }
    __syncwarp();  // p_s is rewritten by the next chunk
  }

#pragma unroll
  for (int h = 0; h < kHeads; ++h) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) l[h] += __shfl_xor_sync(0xffffffffu, l[h], o);
#pragma unroll
    for (int c = 0; c < CH; ++c) o_s[warp][h][c0 + c] = acc[h][c] + accm[h];
    if (lane == 0) {
      m_s[warp][h] = m[h];
      l_s[warp][h] = l[h];
    }
  }
  __syncthreads();

  for (int i = tid; i < nheads * D; i += kThreads) {
    const int h = i / D, d = i % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, m_s[w][h]);
    const float use = mx == -INFINITY ? 0.f : mx;
    float den = 0.f, o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float f = exp2f(m_s[w][h] - use);
      den += f * l_s[w][h];
      o += f * o_s[w][h][d];
    }
    o = den > 0.f ? o / den : 0.f;
    const float lse2 = den > 0.f ? use + log2f(den) : -INFINITY;
    const int64_t row = int64_t(b) * a.num_heads + qh0 + h;
    if (a.num_splits == 1) {
      static_cast<T*>(a.out)[row * D + d] = from_float<T>(o);
      if (d == 0 && a.lse) a.lse[row] = lse2 * kLn2;
    } else {
      const int64_t at = row * a.num_splits + split;
      a.part_out[at * D + d] = o;
      if (d == 0) a.part_lse[at] = lse2;
    }
  }
}

// ---- the tensor-core kernel (page size a multiple of 16) ------------------------------------------

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}
__device__ __forceinline__ uint32_t h2u(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ __half2 u2h(uint32_t u) { return *reinterpret_cast<__half2*>(&u); }
// Codes c, c' sitting in the low bits of each half of w, under the f16 exponent of 1024: (1024 + c,
// 1024 + c') as f16, minus 1024 (exact), times the pair of scales plus the pair of mins: one f16
// rounding of the dequantized value (2^-11 relative), no int-to-float unit.
__device__ __forceinline__ uint32_t dq_pair(uint32_t w, uint32_t mask, __half2 s, __half2 m) {
  const __half2 c = __hsub2(u2h((w & mask) | 0x64006400u), u2h(0x64006400u));
  return h2u(__hfma2(c, s, m));
}
// Two e4m3 codes (the low 16 bits of w) as f16 pair times s (exact conversion, one rounding).
__device__ __forceinline__ uint32_t fp8_pair(uint32_t w, __half2 s) {
  const __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(w & 0xffffu), __NV_E4M3);
  return h2u(__hmul2(*reinterpret_cast<const __half2*>(&raw), s));
}
template <typename T>
__device__ __forceinline__ __half2 to_half2(uint32_t pair);  // two T elements (low first) as f16
template <>
__device__ __forceinline__ __half2 to_half2<__half>(uint32_t pair) { return u2h(pair); }
template <>
__device__ __forceinline__ __half2 to_half2<__nv_bfloat16>(uint32_t pair) {
  return __float22half2_rn(__bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&pair)));
}
template <typename T>
__device__ __forceinline__ uint32_t pair_of(T x, T y) {
  uint32_t r = static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&x)) |
               (static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&y)) << 16);
  return h2u(to_half2<T>(r));
}

// Geometry of the tensor-core kernel for head dim D and BITS (8, 4, 2; 0 = fp8, 8 bits).
template <int D, int BITS>
struct Geo {
  static constexpr int B = BITS == 0 ? 8 : BITS;  // bits per code
  static constexpr int ROWB = D * B / 8;           // code bytes of one token row of one head
  // Tokens per stage: 4 KB of key codes, at least 64 so each warp has a whole 16-token step. Short
  // tiles keep the blocks small (4 per SM for int2) so there are warps to hide the dequantization's
  // latency; the ring's depth (below) then keeps ~100 KB per SM in flight.
  static constexpr int TT = 4096 / ROWB > 64 ? 4096 / ROWB : 64;
  static constexpr int STEPS = TT / kWarps / 16;  // 16-token steps per warp per tile
  static constexpr int CPR = ROWB / 16;           // 16-byte chunks per code row
  static constexpr int SWM = (CPR < 8 ? CPR : 8) - 1;  // chunk swizzle mask (row low bits)
  static constexpr int KLB = ROWB / 4;            // key code bytes a lane reads per token (a quarter row)
  static constexpr int VLB = ROWB / 8;            // value code bytes a lane reads per token (an eighth)
  static constexpr int SLOTS = TT / 16;           // key-statistics slots per stage, one per step
  // Integer formats: a slot is the page's key scale[D] and min[D] (f16); fp8: two 16-byte blocks
  // holding the page's K and V scales.
  static constexpr int SLOT_BYTES = BITS == 0 ? 32 : 4 * D;
  static constexpr int VSLOT = 2 * D / 32 > 4 ? 2 * D / 32 : 4;  // per-token value scale (or min) bytes, G >= 32
  static constexpr int VSTAT_BYTES = BITS == 0 ? 0 : TT * 2 * VSLOT;
  static constexpr int STAGE = 2 * TT * ROWB + SLOTS * SLOT_BYTES + VSTAT_BYTES + SLOTS * 4;
  static constexpr int Q_BYTES = 16 * D * 2;
  static constexpr int TAIL_BYTES = 2 * 16 * D * 2;  // one 16-token step of tail K and V rows (2-byte T)
  // Up to D = 128 the kernel fits in 128 registers (launch bounds below), so four blocks share an SM
  // and the ring is the deepest (4, 3 or 2 stages) within ~56 KB per block; at D = 256 the deepest
  // within ~60 or ~72 KB (4 or 3 blocks per SM, registers permitting).
  static constexpr int EXTRA = Q_BYTES + TAIL_BYTES;
  static constexpr int BUDGET4 = D <= 128 ? 56 * 1024 : 60 * 1024, BUDGET3 = D <= 128 ? 56 * 1024 : 72 * 1024;
  static constexpr int STAGES = 4 * STAGE + EXTRA <= BUDGET4 ? 4 : 3 * STAGE + EXTRA <= BUDGET3 ? 3 : 2;
  static constexpr int MERGE_BYTES = (kWarps * 16 * D + 2 * kWarps * 16) * 4;
  static constexpr int RING = STAGES * STAGE;
  static constexpr int SMEM = (RING > MERGE_BYTES ? RING : MERGE_BYTES) + Q_BYTES + TAIL_BYTES;
};

// T: element type of q, out and the tail pool. D: head dimension. BITS: 8, 4, 2 (KIVI integer
// formats) or 0 (fp8e4m3 with a per-(page, head) scale).
//
// A block owns (sequence, KV head, split) and up to 16 query heads, the rows of m16n8k16 tiles as
// in decode.cu. Codes and statistics stream through a cp.async ring; each warp takes 16-token steps
// of each tile (one page: P is a multiple of 16) and dequantizes its operand fragments straight from
// shared memory into f16 registers, then runs S = Q K^T and O += P V on the tensor cores in f16
// (q converted to f16, exact for bf16 inputs within the f16 range).
// Why a lane's channels are permuted: a fragment pairs two adjacent k indices in one register; for
// K the lane reads a contiguous quarter of its token's code row and takes channels in row order (Q
// is stored in shared memory under the same permutation, so the dot product is unchanged); for V
// each lane owns a contiguous eighth of the channels (output columns permuted, undone in the merge)
// and pairs two tokens per register.
template <typename T, int D, int BITS>
__global__ void __launch_bounds__(kThreads, D <= 128 ? 4 : 1) quant_mma_decode_kernel(const QuantDecodeArgs a) {
  using G = Geo<D, BITS>;
  constexpr int B = G::B, ROWB = G::ROWB, TT = G::TT, CPR = G::CPR, KLB = G::KLB, VLB = G::VLB;
  constexpr int NT = D / 8;  // 8-wide output column tiles
  constexpr int KW = KLB / 4;  // key code words per lane per token (KLB >= 4)
  constexpr int VWB = VLB >= 4 ? VLB : 4;  // value code bytes held per token (VLB = 2 padded)
  static_assert(G::STEPS >= 1, "a warp needs a whole step");

  extern __shared__ __align__(128) unsigned char smem[];
  __half* q_s = reinterpret_cast<__half*>(smem + (G::RING > G::MERGE_BYTES ? G::RING : G::MERGE_BYTES));

  const int hk = blockIdx.x / a.head_chunks;
  const int head0 = (blockIdx.x % a.head_chunks) * 16;
  const int split = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  wait_for_previous_grid();  // launched early (programmatic): nothing above reads memory
  launch_dependents();
  const int nheads = min(16, a.group - head0);
  const int qh0 = hk * a.group + head0;

  const int page_begin = a.indptr[b];
  const int npages = a.indptr[b + 1] - page_begin;
  const int page_size = 1 << a.log2_page;
  const int len = npages > 0 ? (npages - 1) * page_size + a.last_page_len[b] : 0;
  const int qlen = npages > 0 ? (npages - 1) * page_size : 0;  // quantized tokens; the rest is the tail
  const int per_split = ((len + a.num_splits - 1) / a.num_splits + TT - 1) / TT * TT;
  const int start = split * per_split;
  const int end = min(len, start + per_split);
  const int qend = min(end, qlen);
  // Tiles cover the split's quantized tokens [start, qend); its tail tokens [tstart, end), if any, are
  // 16-token steps through a shared buffer whose first step is prefetched before the ring.
  const int ntiles = start < qend ? (qend - start + TT - 1) / TT : 0;
  const int tstart = max(start, qlen);

  // q as f16 (16 rows; rows past the group are zero), column L holding channel phys(L) (see above).
  for (int i = tid; i < 16 * D; i += kThreads) {
    const int r = i / D, L = i % D;
    const int kk = L / 16, ki = L % 16;
    const int ch = ((ki & 7) >> 1) * (D / 4) + kk * 4 + (ki >= 8 ? 2 : 0) + (ki & 1);
    float x = 0.f;
    if (r < nheads) x = to_float(static_cast<const T*>(a.q)[(static_cast<int64_t>(b) * a.num_heads + qh0 + r) * D + ch]);
    q_s[swz<D>(r, L / 8) + L % 8] = __float2half_rn(x);
  }

  const int64_t hkv = a.num_kv_heads;
  const int32_t* seq_pages = a.indices + page_begin;
  const int ng = a.value_groups;
  const int vbytes = 2 * ng;  // bytes of one token's value scales (or mins) of one head
  auto stage_ptr = [&](int stage) { return smem + stage * G::STAGE; };
  // Stage layout: K codes [TT][ROWB], V codes [TT][ROWB], slots [SLOTS][SLOT_BYTES], value stats
  // [TT][scale, min][VSLOT], slot offsets [SLOTS] (fp8: where the head's scale sits in its block).
  auto issue = [&](int tile) {
    unsigned char* st = stage_ptr(tile % G::STAGES);
    const int t0 = start + tile * TT;
#pragma unroll
    for (int i = tid; i < TT * CPR; i += kThreads) {
      const int row = i / CPR, c = i % CPR;
      const int pos = t0 + row;
      const bool valid = pos < qend;
      const int64_t page = valid ? __ldg(seq_pages + (pos >> a.log2_page)) : 0;
      const int64_t off = ((page * page_size + (pos & (page_size - 1))) * hkv + hk) * ROWB + c * 16;
      const int so = row * ROWB + ((c ^ (row & G::SWM)) << 4);
      cp_async16(smem_addr(st + so), a.k_codes + off, valid);
      cp_async16(smem_addr(st + TT * ROWB + so), a.v_codes + off, valid);
    }
    unsigned char* slots = st + 2 * TT * ROWB;
    if constexpr (BITS == 0) {
      int* ofs = reinterpret_cast<int*>(slots + G::SLOTS * G::SLOT_BYTES);
      for (int i = tid; i < G::SLOTS; i += kThreads) {
        const int pos = t0 + i * 16;
        const bool valid = pos < qend;
        const int64_t e = (valid ? __ldg(seq_pages + (pos >> a.log2_page)) : 0) * hkv + hk;
        cp_async16(smem_addr(slots + i * 32), a.k_scale + (e & ~int64_t(7)), valid);
        cp_async16(smem_addr(slots + i * 32 + 16), a.v_scale + (e & ~int64_t(7)), valid);
        ofs[i] = static_cast<int>(e & 7);
      }
    } else {
      constexpr int SC = D / 8;  // 16-byte chunks of one statistic row
      for (int i = tid; i < G::SLOTS * 2 * SC; i += kThreads) {
        const int sl = i / (2 * SC), c = i % (2 * SC);
        const int pos = t0 + sl * 16;
        const bool valid = pos < qend;
        const int64_t e = ((valid ? __ldg(seq_pages + (pos >> a.log2_page)) : 0) * hkv + hk) * D;
        const __half* src = c < SC ? a.k_scale + e + c * 8 : a.k_min + e + (c - SC) * 8;
        cp_async16(smem_addr(slots + sl * G::SLOT_BYTES + c * 16), src, valid);
      }
      unsigned char* vst = slots + G::SLOTS * G::SLOT_BYTES;
      for (int i = tid; i < TT * 2; i += kThreads) {
        const int row = i >> 1, which = i & 1;
        const int pos = t0 + row;
        const bool valid = pos < qend;
        const int64_t page = valid ? __ldg(seq_pages + (pos >> a.log2_page)) : 0;
        const int64_t e = ((page * page_size + (pos & (page_size - 1))) * hkv + hk) * ng;
        const __half* base = which ? a.v_min : a.v_scale;
        const uint32_t dst = smem_addr(vst + i * G::VSLOT);
        if (vbytes >= 16) cp_async16(dst, base + e, valid);
        else if (vbytes == 8) cp_async_small<8>(dst, base + e, valid);
        else cp_async_small<4>(dst, base + (e & ~int64_t(1)), valid);  // 2 or 4 bytes: the aligned word
      }
    }
  };

  float o[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.f, 0.f};
  const uint32_t q_base = smem_addr(q_s);
  const T* k_tail = static_cast<const T*>(a.k_tail);
  const T* v_tail = static_cast<const T*>(a.v_tail);
  const int vgroup = (g * (D / 8)) >> a.log2_group;  // value group of this lane's channels

  T* tail_s = reinterpret_cast<T*>(smem + (G::RING > G::MERGE_BYTES ? G::RING : G::MERGE_BYTES) + G::Q_BYTES);
  auto issue_tail = [&](int c0) {  // tail tokens c0 .. c0 + 15 as rows [K, V][16][D]; past `end` zeros
    const int64_t tail_page = __ldg(seq_pages + npages - 1);
    for (int i = tid; i < 16 * (D / 8); i += kThreads) {
      const int r = i / (D / 8), c = i % (D / 8);
      const bool valid = c0 + r < end;
      const int64_t off = ((tail_page * page_size + (valid ? c0 + r - qlen : 0)) * hkv + hk) * D + c * 8;
      cp_async16(smem_addr(tail_s + r * D + c * 8), k_tail + off, valid);
      cp_async16(smem_addr(tail_s + (16 + r) * D + c * 8), v_tail + off, valid);
    }
  };
  if (tstart < end) issue_tail(tstart);
  cp_async_commit();  // the oldest group: complete once the ring's first wait returns
#pragma unroll
  for (int s = 0; s < G::STAGES - 1; ++s) {
    if (s < ntiles) issue(s);
    cp_async_commit();
  }

  for (int tile = 0; tile < ntiles; ++tile) {
    cp_async_wait<G::STAGES - 2>();
    __syncthreads();
    if (tile + G::STAGES - 1 < ntiles) issue(tile + G::STAGES - 1);
    cp_async_commit();

    const unsigned char* st = stage_ptr(tile % G::STAGES);
    const unsigned char* kc = st;
    const unsigned char* vc = st + TT * ROWB;
    const unsigned char* slots = st + 2 * TT * ROWB;
#pragma unroll 1
    for (int step = 0; step < G::STEPS; ++step) {
      const int tr0 = (warp * G::STEPS + step) * 16;  // first tile row of this step
      const int pos0 = start + tile * TT + tr0;
      if (pos0 >= qend) break;  // warp-uniform; qend is a multiple of 16, so steps are whole
      const unsigned char* slot = slots + (tr0 / 16) * G::SLOT_BYTES;

      // ---- S = Q K^T: two n8 blocks, tokens tr0 + j*8 + g
      float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
      uint32_t kw[2][KW];
      {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int row = tr0 + j * 8 + g;
          const unsigned char* rp = kc + row * ROWB;
          if constexpr (KLB >= 16) {
#pragma unroll
            for (int c = 0; c < KLB / 16; ++c) {
              const int ch = t * (KLB / 16) + c;
              const uint4 v = *reinterpret_cast<const uint4*>(rp + ((ch ^ (row & G::SWM)) << 4));
              kw[j][c * 4] = v.x;
              kw[j][c * 4 + 1] = v.y;
              kw[j][c * 4 + 2] = v.z;
              kw[j][c * 4 + 3] = v.w;
            }
          } else {
            const int byte = t * KLB;
            const unsigned char* p = rp + (((byte >> 4) ^ (row & G::SWM)) << 4) + (byte & 15);
            if constexpr (KLB == 8) {
              const uint2 v = *reinterpret_cast<const uint2*>(p);
              kw[j][0] = v.x;
              kw[j][1] = v.y;
            } else {
              kw[j][0] = *reinterpret_cast<const uint32_t*>(p);
            }
          }
        }
      }
      __half2 ks2 = __float2half2_rn(1.f);
      if constexpr (BITS == 0) {
        const int ofs = reinterpret_cast<const int*>(slots + G::SLOTS * G::SLOT_BYTES)[tr0 / 16];
        ks2 = __half2half2(reinterpret_cast<const __half*>(slot)[ofs]);
      }
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t qa[4];
        ldsm_x4(qa, q_base + 2 * swz<D>((lane & 7) + ((lane >> 3) & 1) * 8, kk * 2 + (lane >> 4)));
        const int ch0 = t * (D / 4) + kk * 4;  // this lane's 4 channels ch0 .. ch0 + 3
        __half2 s01, s23, m01, m23;
        if constexpr (BITS != 0) {
          const uint2 sv = *reinterpret_cast<const uint2*>(slot + ch0 * 2);
          const uint2 mv = *reinterpret_cast<const uint2*>(slot + 2 * D + ch0 * 2);
          s01 = u2h(sv.x), s23 = u2h(sv.y), m01 = u2h(mv.x), m23 = u2h(mv.y);
          // The masks below leave a pair's codes multiplied by 1, 16 (int4) or 1, 4, 16, 64 (int2):
          // the scales divide those powers of two out.
          if constexpr (B == 4) {
            s01 = __hmul2(s01, __halves2half2(__float2half(1.f), __float2half(1.f / 16)));
            s23 = __hmul2(s23, __halves2half2(__float2half(1.f), __float2half(1.f / 16)));
          } else if constexpr (B == 2) {
            s01 = __hmul2(s01, __halves2half2(__float2half(1.f), __float2half(1.f / 4)));
            s23 = __hmul2(s23, __halves2half2(__float2half(1.f / 16), __float2half(1.f / 64)));
          }
        }
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          uint32_t b0, b1;
          if constexpr (BITS == 0) {
            const uint32_t w = kw[j][kk];
            b0 = fp8_pair(w, ks2);
            b1 = fp8_pair(w >> 16, ks2);
          } else if constexpr (B == 8) {
            const uint32_t w = kw[j][kk];
            b0 = dq_pair(prmt(w, 0, 0x4140), 0x00ff00ffu, s01, m01);
            b1 = dq_pair(prmt(w, 0, 0x4342), 0x00ff00ffu, s23, m23);
          } else if constexpr (B == 4) {
            const uint32_t w = kw[j][kk / 2] >> ((kk & 1) * 16);  // 4 nibbles: bytes (c0 c1), (c2 c3)
            b0 = dq_pair(prmt(w, 0, 0x4040), 0x00f0000fu, s01, m01);
            b1 = dq_pair(prmt(w, 0, 0x4141), 0x00f0000fu, s23, m23);
          } else {
            const uint32_t w = prmt(kw[j][kk / 4], 0, 0x4040 + (kk & 3) * 0x0101);  // byte kk%4 twice
            b0 = dq_pair(w, 0x000c0003u, s01, m01);
            b1 = dq_pair(w, 0x00c00030u, s23, m23);
          }
          Elem<__half>::mma(s[j], qa, b0, b1);
        }
      }

      uint32_t pa[4];
      softmax_step<__half, NT>(s, pos0, qend, a.scale_log2, m, l, o, pa);

      // ---- O += P V: tokens x = 2t, 2t+1 (b0) and 2t+8, 2t+9 (b1); lane's channels g*D/8 + nb
      {
        // Code words of the 4 tokens (A, B = 2t, 2t+1; C, D = 2t+8, 2t+9), VWB bytes each.
        uint32_t vw[4][VWB / 4];
        __half2 vs[2], vm[2];  // (scale, min) pairs of tokens (A, B) and (C, D)
#pragma unroll
        for (int x = 0; x < 4; ++x) {
          const int row = tr0 + (x >> 1) * 8 + 2 * t + (x & 1);
          const unsigned char* rp = vc + row * ROWB;
          const int byte = g * VLB;
          const unsigned char* p = rp + (((byte >> 4) ^ (row & G::SWM)) << 4) + (byte & 15);
          if constexpr (VLB >= 16) {
#pragma unroll
            for (int c = 0; c < VLB / 16; ++c) {
              const int ch = g * (VLB / 16) + c;
              const uint4 v = *reinterpret_cast<const uint4*>(rp + ((ch ^ (row & G::SWM)) << 4));
              vw[x][c * 4] = v.x;
              vw[x][c * 4 + 1] = v.y;
              vw[x][c * 4 + 2] = v.z;
              vw[x][c * 4 + 3] = v.w;
            }
          } else if constexpr (VLB == 8) {
            const uint2 v = *reinterpret_cast<const uint2*>(p);
            vw[x][0] = v.x;
            vw[x][1] = v.y;
          } else if constexpr (VLB == 4) {
            vw[x][0] = *reinterpret_cast<const uint32_t*>(p);
          } else {
            vw[x][0] = *reinterpret_cast<const uint16_t*>(p);
          }
        }
        if constexpr (BITS == 0) {
          const int ofs = reinterpret_cast<const int*>(slots + G::SLOTS * G::SLOT_BYTES)[tr0 / 16];
          const __half v1 = reinterpret_cast<const __half*>(slot + 16)[ofs];
          vs[0] = vs[1] = __half2half2(v1);
        } else {
          const __half* vst = reinterpret_cast<const __half*>(slots + G::SLOTS * G::SLOT_BYTES);
          __half sc[4], mn[4];
#pragma unroll
          for (int x = 0; x < 4; ++x) {
            const int row = tr0 + (x >> 1) * 8 + 2 * t + (x & 1);
            // One group per token: its halves sit at the word's parity (rows of a page alternate
            // parity with the token; pages start even since P >= 16).
            const int off = ng == 1 ? ((row * static_cast<int>(hkv) + hk) & 1) : vgroup;
            sc[x] = vst[(row * 2) * (G::VSLOT / 2) + off];
            mn[x] = vst[(row * 2 + 1) * (G::VSLOT / 2) + off];
          }
          vs[0] = __halves2half2(sc[0], sc[1]);
          vs[1] = __halves2half2(sc[2], sc[3]);
          vm[0] = __halves2half2(mn[0], mn[1]);
          vm[1] = __halves2half2(mn[2], mn[3]);
        }
        // The fragments are built per nb for both token pairs, then one mma per nb.
#pragma unroll
        for (int nb = 0; nb < NT; ++nb) {
          uint32_t bb[2];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint32_t* wa = vw[2 * h];
            const uint32_t* wb = vw[2 * h + 1];
            if constexpr (BITS == 0 || B == 8) {
              const int byte = nb % 4, word = nb / 4;
              if constexpr (BITS == 0) {  // byte `byte` of tokens a, b side by side in the low 16 bits
                bb[h] = fp8_pair(prmt(wa[word], wb[word], byte | ((4 + byte) << 4)), vs[h]);
              } else {  // ... in bits 0-7 and 16-23
                bb[h] = dq_pair(prmt(wa[word], wb[word], byte | ((4 + byte) << 8)), 0x00ff00ffu, vs[h], vm[h]);
              }
            } else if constexpr (B == 4) {
              const int byte = (nb / 2) % 4, word = nb / 8;
              const uint32_t z = prmt(wa[word], wb[word], byte | ((4 + byte) << 8));
              const __half2 sc = (nb & 1) ? __hmul2(vs[h], __float2half2_rn(1.f / 16)) : vs[h];
              bb[h] = dq_pair(z, (nb & 1) ? 0x00f000f0u : 0x000f000fu, sc, vm[h]);
            } else {
              const int byte = (nb / 4) % 4, word = nb / 16, sub = nb % 4;
              const uint32_t z = prmt(wa[word], wb[word], byte | ((4 + byte) << 8));
              const __half2 sc = __hmul2(vs[h], __float2half2_rn(1.f / static_cast<float>(1 << (2 * sub))));
              bb[h] = dq_pair(z, 0x00030003u << (2 * sub), sc, vm[h]);
            }
          }
          Elem<__half>::mma(o[nb], pa, bb[0], bb[1]);
        }
      }
    }
  }

  // The tail: full-precision rows, 16 tokens at a time, on warp 0 (one step when P = 16).
  for (int c0 = tstart; c0 < end; c0 += 16) {  // block-uniform
    if (c0 != tstart) {
      __syncthreads();  // warp 0 is done with the buffer
      issue_tail(c0);
      cp_async_commit();
    }
    cp_async_wait<0>();
    __syncthreads();
    if (warp == 0) {
      float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t qa[4];
        ldsm_x4(qa, q_base + 2 * swz<D>((lane & 7) + ((lane >> 3) & 1) * 8, kk * 2 + (lane >> 4)));
        const int ch0 = t * (D / 4) + kk * 4;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const uint32_t* rp = reinterpret_cast<const uint32_t*>(tail_s + (j * 8 + g) * D + ch0);
          Elem<__half>::mma(s[j], qa, h2u(to_half2<T>(rp[0])), h2u(to_half2<T>(rp[1])));
        }
      }
      uint32_t pa[4];
      softmax_step<__half, NT>(s, c0, end, a.scale_log2, m, l, o, pa);
      const T* vt = tail_s + 16 * D + g * (D / 8);
#pragma unroll
      for (int nb = 0; nb < NT; ++nb) {
        Elem<__half>::mma(o[nb], pa, pair_of<T>(vt[(2 * t) * D + nb], vt[(2 * t + 1) * D + nb]),
                          pair_of<T>(vt[(2 * t + 8) * D + nb], vt[(2 * t + 9) * D + nb]));
      }
    }
  }

  // Merge the warps (all share the one head tile). Column 2t + e of tile n is channel (2t + e) * D/8 + n.
  finish_block<T, D, kWarps, 1>(smem, o, m, l, [](int n, int c) { return c * (D / 8) + n; }, nheads,
                                static_cast<int64_t>(b) * a.num_heads + qh0, split, a.num_splits, a.out, a.lse,
                                a.part_out, a.part_lse);
}

// ---- host side -------------------------------------------------------------------------------

struct KernelChoice {
  void (*decode)(QuantDecodeArgs);
  MergeLauncher merge;
  size_t smem;
  int tile;             // tokens per tile (main kernel) or 0 (small-page kernel: whole pages per split)
  int heads_per_block;  // query heads per block
};

template <typename T, int D, int BITS>
KernelChoice make_choice(bool small_pages) {
  if (small_pages) return {quant_small_page_decode_kernel<T, D, BITS>, launch_merge<T>, 0, 0, kHeads};
  return {quant_mma_decode_kernel<T, D, BITS>, launch_merge<T>, static_cast<size_t>(Geo<D, BITS>::SMEM),
          Geo<D, BITS>::TT, 16};
}

template <typename T, int D>
KernelChoice choose_bits(QuantFormat f, bool small_pages) {
  switch (f) {
    case QuantFormat::FP8E4M3: return make_choice<T, D, 0>(small_pages);
    case QuantFormat::INT8: return make_choice<T, D, 8>(small_pages);
    case QuantFormat::INT4: return make_choice<T, D, 4>(small_pages);
    case QuantFormat::INT2: return make_choice<T, D, 2>(small_pages);
  }
  fail(ErrorCode::Unsupported, "unknown quantized format");
}

template <typename T>
KernelChoice choose_dim(int head_dim, QuantFormat f, bool small_pages) {
  switch (head_dim) {
    case 64: return choose_bits<T, 64>(f, small_pages);
    case 128: return choose_bits<T, 128>(f, small_pages);
    case 256: return choose_bits<T, 256>(f, small_pages);
  }
  fail(ErrorCode::Unsupported, "quantized decode supports head_dim 64, 128 and 256, not ", head_dim);
}

// The one dispatch point: dtype x head dim x format x (page size a multiple of 16 or not).
KernelChoice choose_kernel(const QuantDecodeParams& p) {
  const bool small_pages = p.kv.page_size % 16 != 0;
  switch (p.dtype) {
    case DType::BF16: return choose_dim<__nv_bfloat16>(p.shape.head_dim, p.quant.format, small_pages);
    case DType::F16: return choose_dim<__half>(p.shape.head_dim, p.quant.format, small_pages);
    default: break;
  }
  fail(ErrorCode::Dtype, "quantized decode supports f16 and bf16, not ", dtype_name(p.dtype));
}

struct Plan {
  KernelChoice k;
  int head_chunks, splits, pages_per_split;
};

// Splits from host-known capacities (plan_splits in decode_common.cuh): whole tiles per split for
// the main kernel, whole pages (as tiles of one page) for the small-page kernel.
Plan make_plan(const QuantDecodeParams& p) {
  Plan plan{choose_kernel(p), 0, 1, 1};
  const int group = p.shape.num_q_heads / p.shape.num_kv_heads;
  plan.head_chunks = (group + plan.k.heads_per_block - 1) / plan.k.heads_per_block;
  const int64_t max_pages = std::max(1, p.max_pages_per_seq);
  const int64_t max_len = max_pages * p.kv.page_size;
  const int64_t base = int64_t(p.batch) * p.shape.num_kv_heads * plan.head_chunks;
  const int64_t slots = resident_blocks(reinterpret_cast<const void*>(plan.k.decode), plan.k.smem);
  const int tile = plan.k.tile > 0 ? plan.k.tile : p.kv.page_size;
  plan.splits = plan_splits(base, slots, max_len, tile, 0);
  if (plan.k.tile == 0) {
    const int64_t per_split = (max_pages + plan.splits - 1) / plan.splits;
    plan.pages_per_split = static_cast<int>(per_split);
    plan.splits = static_cast<int>((max_pages + per_split - 1) / per_split);
  }
  return plan;
}

size_t workspace_bytes(const QuantDecodeParams& p, const Plan& plan) {
  return split_workspace_bytes(plan.splits, int64_t(p.batch) * p.shape.num_q_heads, p.shape.head_dim);
}

}  // namespace

size_t quantized_decode_workspace_bytes(const QuantDecodeParams& p) {
  return p.batch == 0 ? 0 : workspace_bytes(p, make_plan(p));
}

void launch_quantized_paged_decode(const QuantDecodeParams& p, void* workspace, cudaStream_t stream) {
  if (p.batch == 0) return;
  KV_CHECK(p.batch <= 65535, Unsupported, "quantized decode supports batch up to 65535, not ", p.batch);
  const Plan plan = make_plan(p);
  bool has_pdl = false;
  resident_blocks(reinterpret_cast<const void*>(plan.k.decode), plan.k.smem, &has_pdl);
  QuantDecodeArgs a{};
  a.q = p.q;
  a.out = p.out;
  a.lse = p.lse;
  a.k_codes = static_cast<const uint8_t*>(p.quant.k_codes);
  a.v_codes = static_cast<const uint8_t*>(p.quant.v_codes);
  a.k_scale = reinterpret_cast<const __half*>(p.quant.k_scale);
  a.k_min = reinterpret_cast<const __half*>(p.quant.k_min);
  a.v_scale = reinterpret_cast<const __half*>(p.quant.v_scale);
  a.v_min = reinterpret_cast<const __half*>(p.quant.v_min);
  a.k_tail = p.kv.k_pages;
  a.v_tail = p.kv.v_pages;
  a.indptr = p.kv.indptr;
  a.indices = p.kv.indices;
  a.last_page_len = p.kv.last_page_len;
  a.num_heads = p.shape.num_q_heads;
  a.num_kv_heads = p.shape.num_kv_heads;
  a.group = p.shape.num_q_heads / p.shape.num_kv_heads;
  a.head_chunks = plan.head_chunks;
  a.log2_page = floor_log2(p.kv.page_size);
  a.num_splits = plan.splits;
  a.pages_per_split = plan.pages_per_split;
  a.value_groups = p.quant.format == QuantFormat::FP8E4M3 ? 1 : p.quant.groups();
  a.log2_group = floor_log2(p.quant.group_size);
  a.scale_log2 = p.scale * 1.44269504088896340736f;
  const dim3 grid(p.shape.num_kv_heads * plan.head_chunks, plan.splits, p.batch);
  launch_decode_and_merge(plan.k.decode, plan.k.merge, a, grid, plan.k.smem, int64_t(p.batch) * p.shape.num_q_heads,
                          p.shape.head_dim, workspace, has_pdl, stream, "quantized decode");
}

}  // namespace kvflash::cuda
