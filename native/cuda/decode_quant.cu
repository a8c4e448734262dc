// Paged flash-decoding over a quantized layer (formats in native/core/quant_format.h). Codes and
// scales are read straight from the quantized pages into registers; the last page of each sequence
// comes from the full-precision tail pool. Nothing is dequantized to memory.
//
// The main kernel (page sizes that are multiples of 16) runs on the tensor cores with the
// quantization statistics folded into the other operand, so the codes need one logical op per pair
// (see the section comment below); a block per (sequence, KV head or pair of KV heads, split),
// split-K merged by log-sum-exp (decode_common.cuh). Smaller pages take a simpler CUDA-core kernel.
#include <cuda_fp8.h>

#include <type_traits>

#include "decode_common.cuh"
#include "quant.h"
#include "quant_codes.cuh"
#include "scalar.cuh"

namespace kvflash::cuda {
namespace {

constexpr int kHeads = 8;  // query heads per block of the small-page kernel

struct QuantDecodeArgs : DecodeIO {
  const uint8_t* k_codes;
  const uint8_t* v_codes;
  const __half* k_scale;
  const __half* k_min;
  const __half* v_scale;
  const __half* v_min;
  const void* k_tail;
  const void* v_tail;
  int rows_per_sequence;  // 1, or Hkv when each KV head has its own table row (a Quest selection)
  int head_chunks, num_splits;
  int pages_per_split;  // small-page kernel only (the main kernel derives whole tiles per split)
  int value_groups, log2_group;
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

  const int row = a.rows_per_sequence == 1 ? b : b * a.rows_per_sequence + hk;
  const int page_begin = a.indptr[row];
  const int npages = a.indptr[row + 1] - page_begin;
  const int page_size = 1 << a.log2_page;
  const int len = (npages - 1) * page_size + a.last_page_len[row];
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
//
// The scores are computed transposed, S^T = K Q^T: the 16 tokens of a step are the rows of the
// m16n8k16 A operand, taken from the code words in registers, and the GQA group's heads are the 8
// columns of B (groups up to 8 use one n8 tile, up to 16 two; decode.cu's layout would pad a group
// of 4 to 16 rows and double the products). Quantization statistics never touch the codes:
//   q.k_t = sum_d (q_d s_d) c_td + sum_d q_d m_d
// so the key scales (per page and channel) multiply q once per step (B = q * s), the mins enter
// through a second product with the unscaled q (A = the min vector in every row), and the codes go
// into A as they are: each f16 half is one code masked in place, an f16 subnormal c * 2^-24 (times
// 4^j or 16^j for the code sitting j places up its byte, which q * s divides back out). One
// logical op per pair of codes; the 2^24 is applied to the f32 scores. q * s is rounded to f16, and
// that rounding would be shared by all tokens of a page (the codes are all >= 0, so it does not
// average out: ~1e-3 in the log-sum-exp); its exact residual (one f16 fma) meets the codes in a
// third product, so the scores carry only f32 accumulation error.
// Values: O^T = V^T P^T with V^T as the A operand (rows = channels) and P^T the B operand,
//   o_d = sum_t (p_t s_tg) c_td + sum_t p_t m_tg
// so each 16-channel row tile of V^T lies inside one 32-channel block of one value group, and its
// B operand is P^T with each token's scale of that group folded in (the transpose of the score tile
// by movmatrix). The mins are one more product per step: rows = 32-channel blocks, A = the mins of
// each token, B = P^T. With 2- and 4-bit codes a lane owns 4 channels of every 32-channel block (the
// rows of its two row tiles), the 4 * BITS bits at that block's lane offset; with 8-bit codes a row
// tile is a 16-byte chunk and the lane's rows are its bytes 2g, 2g + 1. 8- and 4-bit pieces come
// paired across tokens straight from ldmatrix.trans. The 2^24 and the 4^j / 16^j of each channel
// come out once, at the end.
// Memory: each warp streams its own 16-token steps (steps w, w + 4, ... of the split; with two KV
// heads a block, two warps per head take steps w, w + 2, ...) through its own cp.async ring of codes and statistics, so no warp waits for another until the end; the
// full-precision tail page is prefetched at the start by the warp that will take it. q lives in
// shared memory (read by ldmatrix each step), which keeps the kernel within 128 registers at
// D <= 128: four blocks (16 warps) per SM.

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}
// The 8x8 matrix of 16-bit elements held as one fragment register per lane, transposed.
__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
  uint32_t r;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(r) : "r"(x));
  return r;
}
__device__ __forceinline__ uint32_t h2u(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ __half2 u2h(uint32_t u) { return *reinterpret_cast<__half2*>(&u); }
// Two e4m3 codes (the low 16 bits of w) as an f16 pair (exact).
__device__ __forceinline__ uint32_t fp8_pair(uint32_t w) {
  const __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(w & 0xffffu), __NV_E4M3);
  return *reinterpret_cast<const uint32_t*>(&raw);
}
// Two T elements (low first) as an f16 pair.
template <typename T>
__device__ __forceinline__ uint32_t to_f16x2(uint32_t pair) {
  if constexpr (std::is_same_v<T, __half>) {
    return pair;
  } else {
    return h2u(__float22half2_rn(__bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&pair))));
  }
}

// Geometry of the tensor-core kernel for head dim D, BITS (8, 4, 2; 0 = fp8), NQ n8 head tiles and
// HB KV heads per block (kWarps / HB warps each).
template <int D, int BITS, int NQ, int HB>
struct Geo {
  static constexpr bool FP8 = BITS == 0;
  static constexpr bool PACKED = BITS == 4 || BITS == 2;  // several codes share a byte
  static constexpr int B = FP8 ? 8 : BITS;  // bits per code
  static constexpr int ROWB = D * B / 8;    // code bytes of one token row of one head
  static constexpr int CPR = ROWB / 16;     // 16-byte chunks per code row
  // Chunk c of code row r sits at chunk c ^ swizzle(r): rows that share a 128-byte bank line keep
  // their chunks, rows of different lines trade them, so the lanes' reads of several rows at one
  // offset meet distinct banks.
  static constexpr int SWM = (CPR < 8 ? CPR : 8) - 1;
  static constexpr int LINE_LOG = CPR >= 8 ? 0 : CPR == 4 ? 1 : CPR == 2 ? 2 : 3;  // log2 rows per line
  __host__ __device__ static constexpr int swizzle(int row) { return (row >> LINE_LOG) & SWM; }
  static constexpr int KLB = ROWB / 4;  // key code bytes a lane reads per token (a quarter row)
  static constexpr int KW = KLB / 4;
  static constexpr int KK = D / 16;     // k16 steps of the scores
  static constexpr int NB = D / 32;     // 32-channel blocks (two V^T row tiles each)
  static constexpr int PB = B / 2;      // code bytes of a lane's 4 channels of a block
  static constexpr int VSB = D / 16 > 4 ? D / 16 : 4;  // bytes of one token's value scales (or mins)
  // One step's slot: K codes [16][ROWB], V codes [16][ROWB], then the key statistics (integer:
  // scale[D] with its 16-byte chunks swizzled by kscale_chunk, min[D]; fp8: the aligned words holding
  // the K and V scales, and which half is this head's), then the value statistics [scale, min][16
  // tokens][VSB] (integer only).
  static constexpr int V_OFF = 16 * ROWB, KS_OFF = 32 * ROWB;
  static constexpr int KS_BYTES = FP8 ? 16 : 4 * D;
  static constexpr int VS_OFF = KS_OFF + KS_BYTES;
  static constexpr int STEP = VS_OFF + (FP8 ? 0 : 2 * 16 * VSB);
  // Four blocks per SM where the registers allow (D <= 128, one head tile), else two; the ring is
  // as deep as the shared memory of that many blocks allows (2 to 8 steps per warp).
  static constexpr int MIN_BLOCKS = D <= 128 && NQ == 1 ? 4 : 2;
  static constexpr int WPH = kWarps / HB;  // warps per KV head
  static constexpr int TAIL = 2 * 16 * D * 2;  // one 16-token chunk of tail K and V rows (per head)
  // q as f16 rows of 8 * NQ heads, twice (the key codes' channel order and the plain one), each row
  // padded by 16 bytes so the 8 rows one ldmatrix reads meet distinct banks.
  static constexpr int QROW = 2 * D + 16;
  static constexpr int Q_BYTES = 2 * 8 * NQ * QROW;  // per head
  static constexpr int FIT = ((MIN_BLOCKS == 4 ? 56 : 112) * 1024 - HB * (TAIL + Q_BYTES)) / (kWarps * STEP);
  static constexpr int STAGES = FIT > 8 ? 8 : FIT < 2 ? 2 : FIT;
  static constexpr int RING = kWarps * STAGES * STEP;
  static constexpr int MERGE = (kWarps * 16 * D + 2 * kWarps * 16) * 4;
  static constexpr int SMEM = (RING + HB * TAIL > MERGE ? RING + HB * TAIL : MERGE) + HB * Q_BYTES;
  // The quarter row of key scales lane t reads: 16-byte chunk i of the scale row is stored at
  // kscale_chunk(i), so the four quarters a phase of 8 lanes reads sit in distinct banks.
  __host__ __device__ static constexpr int kscale_chunk(int i) { return i ^ ((i >> 3) & (D >= 256 ? 3 : D >= 128 ? 1 : 0)); }

  // Key codes: register (kk, e) of a token (A operand columns 2t + 8e, +1 of k-step kk) from the
  // lane's quarter row w[KW]. Its two channels (within the quarter) are lo(kk, e) and hi(kk, e),
  // each a code times mult(kk, e) as an f16 subnormal (fp8: the code's value).
  __host__ __device__ static constexpr int lo(int kk, int e) {
    return B == 8 ? 4 * kk + 2 * e : B == 4 ? 8 * (kk / 2) + 2 * (kk % 2) + e : 16 * (kk / 4) + 2 * (kk % 4) + e;
  }
  __host__ __device__ static constexpr int hi(int kk, int e) { return lo(kk, e) + (B == 8 ? 1 : B == 4 ? 4 : 8); }
  __host__ __device__ static constexpr float mult(int kk, int e) {
    return B == 8 ? 1.f : B == 4 ? ((2 * (kk % 2) + e) & 1 ? 16.f : 1.f) : float(1 << (2 * ((2 * (kk % 4) + e) & 3)));
  }
  __device__ static uint32_t key_pair(const uint32_t (&w)[KW], int kk, int e) {
    if constexpr (FP8) {
      return fp8_pair(w[kk] >> (16 * e));
    } else if constexpr (B == 8) {  // bytes 2e, 2e + 1 into the low byte of each half
      return prmt(w[kk], 0u, e ? 0x4342u : 0x4140u);
    } else if constexpr (B == 4) {  // word kk/2: nibble r of bytes 0, 2 (r < 2) or 1, 3
      const int r = 2 * (kk % 2) + e;
      const uint32_t x = r < 2 ? w[kk / 2] : w[kk / 2] >> 8;
      return x & (r & 1 ? 0x00f000f0u : 0x000f000fu);
    } else {  // word kk/4: 2-bit field r of bytes 0, 2 (r < 4) or 1, 3
      const int r = 2 * (kk % 4) + e;
      const uint32_t x = r < 4 ? w[kk / 4] : w[kk / 4] >> 8;
      return x & (0x00030003u << (2 * (r & 3)));
    }
  }
  // The plain operand order (q for the key mins and the tail): register (kk, e) of lane (g, t)
  // pairs channels nat(kk, e, t) and +1 (integer formats: the order ldmatrix reads rows in; fp8:
  // the codes' own order, so one copy of q serves both).
  __host__ __device__ static constexpr int nat(int kk, int e, int t) {
    return FP8 ? t * (D / 4) + 4 * kk + 2 * e : 16 * kk + 8 * e + 2 * t;
  }
  // Value codes read by ldmatrix.trans (8 and 4 bits: a lane's piece is 16 bits of a 16-byte chunk,
  // per token pair); 2 bits read aligned words (a piece is one byte).
  static constexpr bool VT = B != 2;
  // The channel of row g (+ 8 hi) of V^T row tile 2jb + u: with 8-bit codes tile 2jb + u is chunk
  // 2jb + u (16 channels, rows g and g + 8 its channels 2g, 2g + 1), else rows g, g + 8 are channels
  // cl = 2u, 2u + 1 of the lane's 4 channels of block jb.
  __host__ __device__ static constexpr int vch(int jb, int u, int g, int hi) {
    return 32 * jb + (B == 8 ? 16 * u + 2 * g : 4 * g + 2 * u) + hi;
  }
  // Channel cl (0..3) of a lane's block piece: the power of two its accumulated column carries.
  __host__ __device__ static constexpr float vmult(int cl) {
    return B == 8 ? 1.f : B == 4 ? (cl & 1 ? 16.f : 1.f) : float(1 << (2 * cl));
  }
};


// T: element type of q, out and the tail pool. D: head dimension. BITS: 8, 4, 2 (KIVI integer
// formats) or 0 (fp8e4m3 with a per-(page, head) scale). NQ: n8 head tiles per block (1 or 2).
template <typename T, int D, int BITS, int NQ, int HB>
__global__ void __launch_bounds__(kThreads, Geo<D, BITS, NQ, HB>::MIN_BLOCKS)
    quant_mma_decode_kernel(const QuantDecodeArgs a) {
  using G = Geo<D, BITS, NQ, HB>;
  constexpr int WPH = G::WPH;
  constexpr int ROWB = G::ROWB, CPR = G::CPR, KK = G::KK, NB = G::NB, KW = G::KW, KLB = G::KLB;
  constexpr int S = G::STAGES;
  constexpr bool FP8 = G::FP8;
  constexpr float kSub = 16777216.f;  // 2^24: an f16 subnormal's unit

  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  // The warp's KV head within the block and its place there (spelled out for one head, which keeps
  // that kernel's address arithmetic as it was).
  const int hsub = HB == 1 ? 0 : warp / WPH, wi = HB == 1 ? warp : warp % WPH;
  const int hk0 = blockIdx.x / a.head_chunks * HB;
  const int hk = hk0 + hsub;
  const int head0 = (blockIdx.x % a.head_chunks) * (8 * NQ);
  const int split = blockIdx.y, b = blockIdx.z;
  wait_for_previous_grid();  // launched early (programmatic): nothing above reads memory
  launch_dependents();
  const int nheads = min(8 * NQ, a.group - head0);

  // Per-KV-head rows come with one KV head a block (the plan never pairs heads over them).
  const int row = a.rows_per_sequence == 1 ? b : b * a.rows_per_sequence + hk0;
  const int page_begin = a.indptr[row];
  const int npages = a.indptr[row + 1] - page_begin;
  const int page_size = 1 << a.log2_page;
  const int len = npages > 0 ? (npages - 1) * page_size + a.last_page_len[row] : 0;
  const int qlen = npages > 0 ? (npages - 1) * page_size : 0;  // quantized tokens; the rest is the tail
  const int per_split = ((len + a.num_splits - 1) / a.num_splits + 63) / 64 * 64;
  const int start = split * per_split;
  const int end = min(len, start + per_split);
  const int qend = min(end, qlen);
  // The split's quantized tokens [start, qend) are whole 16-token steps (start and qlen are multiples
  // of 16); warp wi of its head takes steps wi, wi + WPH, ... Its tail tokens [tstart, end) go to the
  // head's warp next in turn.
  const int nsteps = start < qend ? (qend - start) / 16 : 0;
  const int my_steps = nsteps > wi ? (nsteps - wi + WPH - 1) / WPH : 0;
  const int tstart = max(start, qlen);
  const bool tail_warp = tstart < end && wi == nsteps % WPH;

  const int hkv = a.num_kv_heads;
  const int32_t* seq_pages = a.indices + page_begin;
  const int ng = a.value_groups;
  const int vbytes = 2 * ng;  // bytes of one token's value scales (or mins) of one head
  unsigned char* ring = smem + warp * (S * G::STEP);
  T* tail_s = reinterpret_cast<T*>(smem + G::RING + hsub * G::TAIL);  // [K, V][16][D]
  unsigned char* q_base = smem + (G::SMEM - HB * G::Q_BYTES);         // per head [key order, plain][8 * NQ][QROW]
  unsigned char* q_s = q_base + hsub * G::Q_BYTES;

  // What this lane copies of every step: code chunk k is row crow + k * 32 / CPR, 16-byte chunk
  // lane % CPR; 16-byte chunk lane + 32k of the key statistics (the scale row, then the min row);
  // token lane & 15's value scales (lanes 0-15) or mins (16-31). Every source is a lane pointer
  // plus the step's 16-token row block (or page) times a stride: one wide multiply-add each.
  constexpr int NCH = (16 * CPR + 31) / 32;
  constexpr int KSC = (D / 4 + 31) / 32;
  const bool copies_codes = 16 * CPR >= 32 || lane < 16 * CPR;
  const int crow = lane / CPR;
  const uint32_t code_stride = 16u * hkv * ROWB;                // bytes of a 16-token block of code rows
  const uint32_t code_chunk = static_cast<uint32_t>(32 / CPR) * hkv * ROWB;  // code chunk k to k + 1
  const uint8_t* kc_lane = a.k_codes + (static_cast<int64_t>(crow) * hkv + hk) * ROWB + (lane % CPR) * 16;
  const uint8_t* vc_lane = a.v_codes + (kc_lane - a.k_codes);
  uint32_t code_dst[NCH];  // slot-relative
#pragma unroll
  for (int k = 0; k < NCH; ++k) {
    const int r = crow + k * (32 / CPR);
    code_dst[k] = r * ROWB + (((lane % CPR) ^ G::swizzle(r)) << 4);
  }
  const uint32_t kstat_stride = hkv * D * 2;  // bytes of a page's key scale (or min) rows
  const unsigned char* ks_lane[KSC];
  const uint32_t vstat_stride = 16u * hkv * ng * 2;  // bytes of a 16-token block's value scale (or min) rows
  const unsigned char* vs_lane = nullptr;
  if constexpr (!FP8) {
#pragma unroll
    for (int k = 0; k < KSC; ++k) {
      const int i = lane + 32 * k;  // chunk i of the [scale, min] rows
      const __half* row = i >= D / 8 ? a.k_min + (i - D / 8) * 8 : a.k_scale + i * 8;
      ks_lane[k] = reinterpret_cast<const unsigned char*>(row + static_cast<int64_t>(hk) * D);
    }
    // One token's statistics of this head: 2 * ng bytes, read as the aligned 4 bytes holding them
    // when that is 2 (rows start at multiples of 4 bytes, as 16 * hkv * 2 is one).
    const uintptr_t p = reinterpret_cast<uintptr_t>((lane < 16 ? a.v_scale : a.v_min) +
                                                    (static_cast<int64_t>(lane & 15) * hkv + hk) * ng);
    vs_lane = reinterpret_cast<const unsigned char*>(vbytes < 4 ? p & ~uintptr_t(3) : p);
  }
  const int lg_steps = a.log2_page - 4;  // log2 of the 16-token blocks per page
  const int pos_w = start + 16 * wi;  // this warp's first token; step j starts at pos_w + 16 WPH j
  auto page_of = [&](int j) { return __ldg(seq_pages + ((pos_w + 16 * WPH * j) >> a.log2_page)); };
  auto issue = [&](int j, int slot, int page) {
    const uint32_t st = smem_addr(ring) + slot * G::STEP;
    // The step's 16-token block of the pool: its page's first block plus the block within the page.
    const uint32_t blk = (static_cast<uint32_t>(page) << lg_steps) + (((pos_w >> 4) + WPH * j) & ((1 << lg_steps) - 1));
    if (copies_codes) {
      const uint8_t* kc = kc_lane + static_cast<uint64_t>(blk) * code_stride;
      const uint8_t* vc = vc_lane + static_cast<uint64_t>(blk) * code_stride;
#pragma unroll
      for (int k = 0; k < NCH; ++k) {
        cp_async16(st + code_dst[k], kc + k * code_chunk, true);
        cp_async16(st + G::V_OFF + code_dst[k], vc + k * code_chunk, true);
      }
    }
    if constexpr (FP8) {
      const int64_t e = static_cast<int64_t>(page) * hkv + hk;
      if (lane < 2) cp_async_small<4>(st + G::KS_OFF + 4 * lane, (lane ? a.v_scale : a.k_scale) + (e & ~int64_t(1)), true);
      if (lane == 2) *reinterpret_cast<int*>(ring + slot * G::STEP + G::KS_OFF + 8) = static_cast<int>(e & 1);
    } else {
#pragma unroll
      for (int k = 0; k < KSC; ++k) {
        const int i = lane + 32 * k;
        if (i < D / 4) {
          cp_async16(st + G::KS_OFF + 16 * (i >= D / 8 ? i : G::kscale_chunk(i)),
                     ks_lane[k] + static_cast<uint64_t>(page) * kstat_stride, true);
        }
      }
      const unsigned char* src = vs_lane + static_cast<uint64_t>(blk) * vstat_stride;
      const uint32_t dst = st + G::VS_OFF + lane * G::VSB;  // [scale, min][token][VSB]
      if (vbytes >= 16) cp_async16(dst, src, true);
      else if (vbytes == 8) cp_async_small<8>(dst, src, true);
      else cp_async_small<4>(dst, src, true);
    }
  };
  auto issue_tail = [&](int c0) {  // tail tokens c0 .. c0 + 15 as rows [K, V][16][D]; past `end` zeros
    const int64_t tail_page = __ldg(seq_pages + npages - 1);
    for (int i = lane; i < 16 * (D / 8); i += 32) {
      const int r = i / (D / 8), c = i % (D / 8);
      const bool valid = c0 + r < end;
      const int64_t off = ((tail_page * page_size + (valid ? c0 + r - qlen : 0)) * hkv + hk) * D + c * 8;
      cp_async16(smem_addr(tail_s + r * D + c * 8), static_cast<const T*>(a.k_tail) + off, valid);
      cp_async16(smem_addr(tail_s + (16 + r) * D + c * 8), static_cast<const T*>(a.v_tail) + off, valid);
    }
  };

  // The oldest group: the tail's first chunk (empty for the other warps), then S - 1 steps ahead.
  if (tail_warp) issue_tail(tstart);
  cp_async_commit();
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < my_steps) issue(s, s, page_of(s));
    cp_async_commit();
  }
  int next_page = S - 1 < my_steps ? page_of(S - 1) : 0;

  // q as f16 rows, read as B fragments by ldmatrix: in the key codes' order (chunk 2kk + e holds,
  // for t = 0..3, the pair key_pair (kk, e) of quarter t, each channel divided by the power of two
  // its code carries: exact) and in the plain order (integer formats: for the key mins and the tail).
#pragma unroll
  for (int hs = 0; hs < HB; ++hs) {
    unsigned char* qh = q_base + hs * G::Q_BYTES;
    for (int i = threadIdx.x; i < 8 * NQ * D; i += kThreads) {
      const int h = i / D, pos = i % D;
      const int c = pos / 8, el = pos % 8, kk = c / 2, e = c % 2, tt = el / 2;
      const int ch = tt * (D / 4) + (el & 1 ? G::hi(kk, e) : G::lo(kk, e));
      const T* row = static_cast<const T*>(a.q) + (static_cast<int64_t>(b) * a.num_heads + (hk0 + hs) * a.group + head0 + h) * D;
      const bool valid = h < nheads;
      reinterpret_cast<__half*>(qh + h * G::QROW)[pos] = __float2half_rn(valid ? to_float(row[ch]) / G::mult(kk, e) : 0.f);
      if constexpr (!FP8) {
        reinterpret_cast<__half*>(qh + (8 * NQ + h) * G::QROW)[pos] = __float2half_rn(valid ? to_float(row[pos]) : 0.f);
      }
    }
  }
  __syncthreads();
  // Lane address of ldmatrix x4 for head tile n, array arr (0: key order, 1: plain), k-steps 2kk2, +1.
  const uint32_t q_read = smem_addr(q_s) + (lane & 7) * G::QROW + (lane >> 3) * 16;
  auto q_frag = [&](uint32_t (&r)[4], int arr, int n, int kk2) {
    ldsm_x4(r, q_read + (arr * 8 * NQ + 8 * n) * G::QROW + kk2 * 64);
  };
  const float sl = a.scale_log2;

  float o[NQ][2 * NB][4], vm[NQ][4];  // O^T tiles (rows: channels, columns: heads 2t, 2t + 1), value mins
  float m[NQ][2], l[NQ][2];           // per head 8n + 2t + i: running max (log2 domain) and the lane's sum
#pragma unroll
  for (int n = 0; n < NQ; ++n) {
#pragma unroll
    for (int i = 0; i < 2 * NB; ++i) o[n][i][0] = o[n][i][1] = o[n][i][2] = o[n][i][3] = 0.f;
    vm[n][0] = vm[n][1] = vm[n][2] = vm[n][3] = 0.f;
    m[n][0] = m[n][1] = -INFINITY;
    l[n][0] = l[n][1] = 0.f;
  }

  // The online softmax of one 16-token step: s[n] holds (token g, heads 2t, 2t + 1) and (token g + 8,
  // ...) in the log2 domain; returns the probabilities packed as f16 pairs per token row.
  auto softmax = [&](float (&s)[NQ][4], uint32_t (&hp)[NQ][2]) {
    float factor[NQ][2];
    bool changed = false;
#pragma unroll
    for (int n = 0; n < NQ; ++n) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float mx = fmaxf(s[n][i], s[n][i + 2]);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
        const float mn = fmaxf(m[n][i], mx);
        const float use = mn == -INFINITY ? 0.f : mn;  // an all-masked head keeps p = 0, not NaN
        factor[n][i] = exp2_ftz(m[n][i] - use);
        changed |= mn != m[n][i];
        m[n][i] = mn;
        const float p0 = exp2_ftz(s[n][i] - use), p1 = exp2_ftz(s[n][i + 2] - use);
        l[n][i] = l[n][i] * factor[n][i] + (p0 + p1);
        s[n][i] = p0;
        s[n][i + 2] = p1;
      }
      hp[n][0] = h2u(__floats2half2_rn(s[n][0], s[n][1]));
      hp[n][1] = h2u(__floats2half2_rn(s[n][2], s[n][3]));
    }
    // The accumulators are rescaled only when a maximum moved (rare once a sequence is under way).
    if (__any_sync(0xffffffffu, changed)) {
#pragma unroll
      for (int n = 0; n < NQ; ++n) {
#pragma unroll
        for (int i = 0; i < 2 * NB; ++i) {
          o[n][i][0] *= factor[n][0];
          o[n][i][1] *= factor[n][1];
          o[n][i][2] *= factor[n][0];
          o[n][i][3] *= factor[n][1];
        }
        vm[n][0] *= factor[n][0];
        vm[n][1] *= factor[n][1];
      }
    }
  };

  // Lane constants of the reads. Key codes: rows g, g + 8 (one swizzle), the lane's quarter. 2-bit
  // value pieces: rows 2t, 2t + 8 and 2t + 1, 2t + 9 (a swizzle each), the aligned word holding the
  // lane's piece, the byte of the piece within it and the selector pairing that byte of two tokens
  // into the low bytes of an f16 pair (8- and 4-bit pieces come by ldmatrix.trans, below).
  // Value statistics: the f16 of the group of block jb sits at half (jb >> lg_blocks) of a token's VSB
  // bytes, or with one group per token (ng == 1) at the half of its aligned word given by the row's
  // parity (rows g and g + 8 share it; pages start even); vsel[jb] broadcasts that half.
  const int kswz = G::swizzle(g);
  const int vswz[2] = {G::swizzle(2 * t), G::swizzle(2 * t + 1)};
  const int vbyte = (g * G::PB) & ~3;
  const int pbyte = (g * G::PB) & 3;
  const uint32_t sel0 = pbyte | ((4 + pbyte) << 8);
  const int lg_blocks = a.log2_group - 5;  // log2 of the 32-channel blocks per value group
  auto vstat_off = [&](int r, int jb) { return ng == 1 ? 2 * ((r * hkv + hk) & 1) : 2 * (jb >> lg_blocks); };
  uint32_t vsel[NB];
#pragma unroll
  for (int jb = 0; jb < NB; ++jb) vsel[jb] = ((vstat_off(g, jb) / 2) & 3) * 0x2222u + 0x1010u;
  // Value pieces by ldmatrix.trans (G::VT): x4 number c reads the matrices i = lane / 8 of (token rows
  // 8 (i & 1) + 0..7, 16-byte chunk 2c + (i >> 1)); lane (g, t) receives bytes 2g, 2g + 1 of that
  // chunk of tokens 2t and 2t + 1 (+ 8), already paired.
  uint32_t vld[G::VT ? CPR / 2 : 1];
  if constexpr (G::VT) {
    const int row = 8 * ((lane >> 3) & 1) + (lane & 7);
#pragma unroll
    for (int c = 0; c < CPR / 2; ++c) {
      vld[c] = G::V_OFF + row * ROWB + (((2 * c + (lane >> 4)) ^ G::swizzle(row)) << 4);
    }
  }
  // Key mins by ldmatrix: every row of the A tile is the min vector (lanes 0-15 point at channels
  // 16kk .. +7, lanes 16-31 at 16kk + 8 .. +15).
  const int kmin_read = G::KS_OFF + 2 * D + ((lane >> 4) & 1) * 16;

  int slot = 0, slot_issue = S - 1;
#pragma unroll 1
  for (int j = 0; j < my_steps; ++j) {
    cp_async_wait<S - 2>();
    __syncwarp();
    if (j + S - 1 < my_steps) issue(j + S - 1, slot_issue, next_page);
    cp_async_commit();
    if (j + S < my_steps) next_page = page_of(j + S);
    const unsigned char* st = ring + slot * G::STEP;
    slot = slot + 1 == S ? 0 : slot + 1;
    slot_issue = slot_issue + 1 == S ? 0 : slot_issue + 1;

    // ---- scores S^T = K Q^T of tokens g, g + 8 (rows) and heads 2t, 2t + 1 (columns)
    uint32_t kw[2][KW];
#pragma unroll
    for (int jj = 0; jj < 2; ++jj) {
      const unsigned char* rp = st + (g + 8 * jj) * ROWB;
      if constexpr (KLB >= 16) {
#pragma unroll
        for (int c = 0; c < KLB / 16; ++c) {
          const uint4 v = *reinterpret_cast<const uint4*>(rp + (((t * (KLB / 16) + c) ^ kswz) << 4));
          kw[jj][4 * c] = v.x, kw[jj][4 * c + 1] = v.y, kw[jj][4 * c + 2] = v.z, kw[jj][4 * c + 3] = v.w;
        }
      } else {
        const unsigned char* p = rp + ((((t * KLB) >> 4) ^ kswz) << 4) + ((t * KLB) & 15);
        if constexpr (KLB == 8) {
          const uint2 v = *reinterpret_cast<const uint2*>(p);
          kw[jj][0] = v.x, kw[jj][1] = v.y;
        } else {
          kw[jj][0] = *reinterpret_cast<const uint32_t*>(p);
        }
      }
    }
    float s[NQ][4];
    if constexpr (FP8) {
      const int par = *reinterpret_cast<const int*>(st + G::KS_OFF + 8);
      const float ks = __half2float(reinterpret_cast<const __half*>(st + G::KS_OFF)[par]) * sl;
      float acc[NQ][4] = {};
#pragma unroll
      for (int kk = 0; kk < KK; kk += 2) {
#pragma unroll
        for (int n = 0; n < NQ; ++n) {
          uint32_t qf[4];
          q_frag(qf, 0, n, kk / 2);
#pragma unroll
          for (int k2 = 0; k2 < 2; ++k2) {
            const uint32_t ka[4] = {G::key_pair(kw[0], kk + k2, 0), G::key_pair(kw[1], kk + k2, 0),
                                    G::key_pair(kw[0], kk + k2, 1), G::key_pair(kw[1], kk + k2, 1)};
            Elem<__half>::mma(acc[n], ka, qf[2 * k2], qf[2 * k2 + 1]);
          }
        }
      }
#pragma unroll
      for (int n = 0; n < NQ; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) s[n][i] = acc[n][i] * ks;
      }
    } else {
      // The lane's quarter of the page's key scales: words of channel pairs (2i, 2i + 1).
      constexpr int QW = D / 8;
      uint32_t sw[QW];
#pragma unroll
      for (int c = 0; c < QW / 4; ++c) {
        const int chunk = G::kscale_chunk(t * (D / 32) + c);
        const uint4 x = *reinterpret_cast<const uint4*>(st + G::KS_OFF + 16 * chunk);
        sw[4 * c] = x.x, sw[4 * c + 1] = x.y, sw[4 * c + 2] = x.z, sw[4 * c + 3] = x.w;
      }
      const uint32_t kmin = smem_addr(st + kmin_read);
      // q * s rounded to f16 (qs) and its rounding error (exact, by one fma): the codes meet both, so
      // the scores carry no rounding of the scales (that error would be shared by a page's tokens).
      float acc[NQ][4] = {}, acce[NQ][4] = {}, accm[NQ][4] = {};
#pragma unroll
      for (int kk = 0; kk < KK; kk += 2) {
#pragma unroll
        for (int n = 0; n < NQ; ++n) {
          uint32_t qf[4], qn[4];
          q_frag(qf, 0, n, kk / 2);
          q_frag(qn, 1, n, kk / 2);
#pragma unroll
          for (int k2 = 0; k2 < 2; ++k2) {
            const int k = kk + k2;
            const uint32_t ka[4] = {G::key_pair(kw[0], k, 0), G::key_pair(kw[1], k, 0), G::key_pair(kw[0], k, 1),
                                    G::key_pair(kw[1], k, 1)};
            uint32_t qs[2], qe[2];
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int lo = G::lo(k, e), hi = G::hi(k, e);
              const __half2 sp = u2h(G::PACKED ? prmt(sw[lo / 2], sw[hi / 2], lo & 1 ? 0x7632u : 0x5410u) : sw[2 * k + e]);
              const __half2 q2 = u2h(qf[2 * k2 + e]);
              const __half2 p = __hmul2(q2, sp);
              qs[e] = h2u(p);
              qe[e] = h2u(__hfma2(q2, sp, __hneg2(p)));
            }
            uint32_t ma[4];
            ldsm_x4(ma, kmin + 32 * k);
            Elem<__half>::mma(acc[n], ka, qs[0], qs[1]);
            Elem<__half>::mma(acce[n], ka, qe[0], qe[1]);
            Elem<__half>::mma(accm[n], ma, qn[2 * k2], qn[2 * k2 + 1]);
          }
        }
      }
#pragma unroll
      for (int n = 0; n < NQ; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) s[n][i] = fmaf(acc[n][i] + acce[n][i], kSub * sl, accm[n][i] * sl);
      }
    }

    uint32_t hp[NQ][2];
    softmax(s, hp);

    // ---- O^T += V^T P^T: rows (channels) G::vch, tokens 2t, 2t + 1 (x = 0, 1), 2t + 8, 2t + 9
    // The lane's value codes: the aligned word holding its piece of block jb of token x (vw[x][jb]), or
    // with ldmatrix its pair of 16-bit pieces of chunk c of tokens 2t, 2t + 1 (+ 8 h) (vw[2h][c]).
    uint32_t vw[4][G::VT ? CPR : NB];
    if constexpr (G::VT) {
#pragma unroll
      for (int c = 0; c < CPR / 2; ++c) {
        uint32_t r[4];
        ldsm_x4_trans(r, smem_addr(st) + vld[c]);
#pragma unroll
        for (int i = 0; i < 4; ++i) vw[2 * (i & 1)][2 * c + (i >> 1)] = r[i];
      }
    } else {
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        const unsigned char* rp = st + G::V_OFF + ((x >> 1) * 8 + 2 * t + (x & 1)) * ROWB;
#pragma unroll
        for (int jb = 0; jb < NB; ++jb) {
          const int byte = jb * 4 * G::B + vbyte;
          vw[x][jb] = *reinterpret_cast<const uint32_t*>(rp + (((byte >> 4) ^ vswz[x & 1]) << 4) + (byte & 15));
        }
      }
    }
    const unsigned char* vst = st + G::VS_OFF;
    uint32_t pt[NQ][2];  // P^T as B fragments (tokens 2t.. and 2t + 8.., head g)
#pragma unroll
    for (int n = 0; n < NQ; ++n) pt[n][0] = transpose8x8(hp[n][0]), pt[n][1] = transpose8x8(hp[n][1]);
    // Value scales of tokens g and g + 8: the words of their VSB bytes that hold the lane's halves
    // (D = 256 with 8 groups: words 2, 3 for blocks 4..7).
    uint32_t vsw[2][2] = {}, vsw_hi[2][2] = {};
    if constexpr (!FP8) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const unsigned char* row = vst + (g + 8 * r) * G::VSB;
        if constexpr (G::VSB == 4) {
          vsw[r][0] = vsw[r][1] = *reinterpret_cast<const uint32_t*>(row);
        } else if constexpr (G::VSB == 8) {
          const uint2 w = *reinterpret_cast<const uint2*>(row);
          vsw[r][0] = w.x, vsw[r][1] = w.y;
        } else {
          const uint4 w = *reinterpret_cast<const uint4*>(row);
          vsw[r][0] = w.x, vsw[r][1] = w.y;
          vsw_hi[r][0] = lg_blocks == 0 ? w.z : w.x;
          vsw_hi[r][1] = lg_blocks == 0 ? w.w : w.y;
        }
      }
      // Value mins: rows = the lane's block g (if any), columns = tokens.
      uint32_t ma[4] = {0u, 0u, 0u, 0u};
      if (g < NB) {
        const __half* mn = reinterpret_cast<const __half*>(vst + 16 * G::VSB);
        auto at = [&](int r) { return mn[(r * G::VSB + vstat_off(r, g)) / 2]; };
        ma[0] = h2u(__halves2half2(at(2 * t), at(2 * t + 1)));
        ma[2] = h2u(__halves2half2(at(2 * t + 8), at(2 * t + 9)));
      }
#pragma unroll
      for (int n = 0; n < NQ; ++n) Elem<__half>::mma(vm[n], ma, pt[n][0], pt[n][1]);
    }
    __half2 vs8 = __float2half2_rn(1.f);
    if constexpr (FP8) {
      const int par = *reinterpret_cast<const int*>(st + G::KS_OFF + 8);
      vs8 = __half2half2(reinterpret_cast<const __half*>(st + G::KS_OFF + 4)[par]);
    }
#pragma unroll
    for (int jb = 0; jb < NB; ++jb) {
      // A fragments of row tiles 2jb (channels cl = 0, 1) and 2jb + 1 (cl = 2, 3).
      uint32_t va[2][4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // token pair (2t, 2t + 1) or (2t + 8, 2t + 9)
        if constexpr (G::B == 8) {  // chunk 2jb + u: rows g, g + 8 = bytes 2g, 2g + 1 of both tokens
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            const uint32_t x = vw[2 * h][2 * jb + u];
            if constexpr (FP8) {
              va[u][2 * h] = fp8_pair(prmt(x, 0u, 0x20u)), va[u][2 * h + 1] = fp8_pair(prmt(x, 0u, 0x31u));
            } else {
              va[u][2 * h] = prmt(x, 0u, 0x4240u), va[u][2 * h + 1] = prmt(x, 0u, 0x4341u);
            }
          }
        } else if constexpr (G::B == 4) {  // block jb: byte 2g (cl = 0, 1), 2g + 1 (cl = 2, 3) of both tokens
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            const uint32_t x = vw[2 * h][jb] >> (8 * u);
            va[u][2 * h] = x & 0x000f000fu;
            va[u][2 * h + 1] = x & 0x00f000f0u;
          }
        } else {
          const uint32_t x = prmt(vw[2 * h][jb], vw[2 * h + 1][jb], sel0);
#pragma unroll
          for (int cl = 0; cl < 4; ++cl) va[cl / 2][2 * h + cl % 2] = x & (0x00030003u << (2 * cl));
        }
      }
#pragma unroll
      for (int n = 0; n < NQ; ++n) {
        uint32_t bs[2];
        if constexpr (FP8) {
          bs[0] = h2u(__hmul2(u2h(pt[n][0]), vs8));
          bs[1] = h2u(__hmul2(u2h(pt[n][1]), vs8));
        } else {  // each token's scale of this block's group, on its row of P before the transpose
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const uint32_t(&w)[2] = jb < 4 ? vsw[r] : vsw_hi[r];
            bs[r] = transpose8x8(h2u(__hmul2(u2h(hp[n][r]), u2h(prmt(w[0], w[1], vsel[jb])))));
          }
        }
        Elem<__half>::mma(o[n][2 * jb], va[0], bs[0], bs[1]);
        Elem<__half>::mma(o[n][2 * jb + 1], va[1], bs[0], bs[1]);
      }
    }
  }

  // To real units: a quantized column carries 2^24 / vmult(cl) (fp8: nothing), plus its block's mins.
#pragma unroll
  for (int n = 0; n < NQ; ++n) {
#pragma unroll
    for (int jb = 0; jb < NB; ++jb) {
      float add[2] = {0.f, 0.f};
      if constexpr (!FP8) {
        add[0] = __shfl_sync(0xffffffffu, vm[n][0], jb * 4 + t);
        add[1] = __shfl_sync(0xffffffffu, vm[n][1], jb * 4 + t);
      }
#pragma unroll
      for (int u = 0; u < 2; ++u) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float f = FP8 ? 1.f : kSub / G::vmult(2 * u + (e >> 1));
          o[n][2 * jb + u][e] = fmaf(o[n][2 * jb + u][e], f, add[e & 1]);
        }
      }
    }
  }

  // The tail: full-precision rows, 16 tokens at a time, on one warp (one chunk when P = 16).
  if (tail_warp) {
    for (int c0 = tstart; c0 < end; c0 += 16) {
      if (c0 != tstart) {
        __syncwarp();  // every lane is done with the buffer
        issue_tail(c0);
        cp_async_commit();
      }
      cp_async_wait<0>();
      __syncwarp();
      float s[NQ][4] = {};
#pragma unroll
      for (int kk = 0; kk < KK; kk += 2) {
#pragma unroll
        for (int n = 0; n < NQ; ++n) {
          uint32_t qf[4];
          q_frag(qf, FP8 ? 0 : 1, n, kk / 2);
#pragma unroll
          for (int k2 = 0; k2 < 2; ++k2) {
            uint32_t ka[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {  // rows g, g + 8; channels nat(kk + k2, e, t), +1
              const int row = g + 8 * (i & 1), e = i >> 1;
              ka[i] = to_f16x2<T>(*reinterpret_cast<const uint32_t*>(tail_s + row * D + G::nat(kk + k2, e, t)));
            }
            Elem<__half>::mma(s[n], ka, qf[2 * k2], qf[2 * k2 + 1]);
          }
        }
      }
#pragma unroll
      for (int n = 0; n < NQ; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) s[n][i] = c0 + g + 8 * (i >> 1) < end ? s[n][i] * sl : -INFINITY;
      }
      uint32_t hp[NQ][2], pt[NQ][2];
      softmax(s, hp);
#pragma unroll
      for (int n = 0; n < NQ; ++n) pt[n][0] = transpose8x8(hp[n][0]), pt[n][1] = transpose8x8(hp[n][1]);
      const T* vt = tail_s + 16 * D;
#pragma unroll
      for (int jb = 0; jb < NB; ++jb) {
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          uint32_t w[4];  // channels (ch, ch + 1) of tokens 2t, 2t + 1, 2t + 8, 2t + 9
          const int ch = G::vch(jb, u, g, 0);
#pragma unroll
          for (int x = 0; x < 4; ++x) {
            w[x] = to_f16x2<T>(*reinterpret_cast<const uint32_t*>(vt + ((x >> 1) * 8 + 2 * t + (x & 1)) * D + ch));
          }
          const uint32_t va[4] = {prmt(w[0], w[1], 0x5410u), prmt(w[0], w[1], 0x7632u), prmt(w[2], w[3], 0x5410u),
                                  prmt(w[2], w[3], 0x7632u)};
#pragma unroll
          for (int n = 0; n < NQ; ++n) Elem<__half>::mma(o[n][2 * jb + u], va, pt[n][0], pt[n][1]);
        }
      }
    }
  }

  // Merge the warps: each leaves its heads' rows (channels G::vch) and (m, l) in shared memory.
  cp_async_wait<0>();
  __syncthreads();
  float* o_s = reinterpret_cast<float*>(smem);  // [kWarps][16][D]
  float* m_s = o_s + kWarps * 16 * D;           // [kWarps][16]
  float* l_s = m_s + kWarps * 16;               // [kWarps][16]
  float* ow = o_s + warp * 16 * D;
#pragma unroll
  for (int n = 0; n < NQ; ++n) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      l[n][i] += __shfl_xor_sync(0xffffffffu, l[n][i], 4);
      l[n][i] += __shfl_xor_sync(0xffffffffu, l[n][i], 8);
      l[n][i] += __shfl_xor_sync(0xffffffffu, l[n][i], 16);
    }
#pragma unroll
    for (int jb = 0; jb < NB; ++jb) {
#pragma unroll
      for (int u = 0; u < 2; ++u) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          ow[(8 * n + 2 * t + (e & 1)) * D + G::vch(jb, u, g, e >> 1)] = o[n][2 * jb + u][e];
        }
      }
    }
    if (g == 0) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        m_s[warp * 16 + 8 * n + 2 * t + i] = m[n][i];
        l_s[warp * 16 + 8 * n + 2 * t + i] = l[n][i];
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int hs = 0; hs < HB; ++hs) {  // the WPH warps of each KV head sit together
    store_block_output<T, D, WPH, 1>(o_s + hs * WPH * 16 * D, m_s + hs * WPH * 16, l_s + hs * WPH * 16, nheads,
                                     static_cast<int64_t>(b) * a.num_heads + (hk0 + hs) * a.group + head0, split,
                                     a.num_splits, a.out, a.lse, a.part_out, a.part_lse);
  }
}

// ---- host side -------------------------------------------------------------------------------

struct KernelChoice {
  void (*decode)(QuantDecodeArgs);
  MergeLauncher merge;
  size_t smem;
  int tile;             // tokens per tile (main kernel) or 0 (small-page kernel: whole pages per split)
  int heads_per_block;  // query heads per block (of one KV head)
  int kv_heads;         // KV heads per block
  int step_bytes;       // bytes a warp of the main kernel copies per 16-token step (0: small-page kernel)
};

template <typename T, int D, int BITS, int NQ, int HB>
KernelChoice mma_choice() {
  using G = Geo<D, BITS, NQ, HB>;
  return {quant_mma_decode_kernel<T, D, BITS, NQ, HB>, launch_merge<T>, static_cast<size_t>(G::SMEM), kWarps * 16, 8 * NQ,
          HB, G::STEP};
}

// Groups up to 8 heads take one n8 tile of heads per block, larger groups two (16 heads a block)
// up to D = 128; at D = 256 two tiles would not fit the registers, so blocks take 8 heads each.
// pair_heads asks for two KV heads per block (two warps each) where that exists: int4 at D = 128,
// the one case measured to gain (H100, B x 4096 / B = 64: 159 vs 175 us; 128 x 2048: 151 vs 171 us;
// int2 lost 8%: its 32-byte steps already hide little latency with 4 warps per head).
template <typename T, int D, int BITS>
KernelChoice make_choice(bool small_pages, int group, bool pair_heads) {
  if (small_pages) return {quant_small_page_decode_kernel<T, D, BITS>, launch_merge<T>, 0, 0, kHeads, 1, 0};
  if constexpr (D <= 128) {
    if (group > 8) return mma_choice<T, D, BITS, 2, 1>();
  }
  if constexpr (D == 128 && BITS == 4) {
    if (pair_heads) return mma_choice<T, D, BITS, 1, 2>();
  }
  return mma_choice<T, D, BITS, 1, 1>();
}

template <typename T, int D>
KernelChoice choose_bits(QuantFormat f, bool small_pages, int group, bool pair_heads) {
  switch (f) {
    case QuantFormat::FP8E4M3: return make_choice<T, D, 0>(small_pages, group, pair_heads);
    case QuantFormat::INT8: return make_choice<T, D, 8>(small_pages, group, pair_heads);
    case QuantFormat::INT4: return make_choice<T, D, 4>(small_pages, group, pair_heads);
    case QuantFormat::INT2: return make_choice<T, D, 2>(small_pages, group, pair_heads);
  }
  fail(ErrorCode::Unsupported, "unknown quantized format");
}

template <typename T>
KernelChoice choose_dim(int head_dim, QuantFormat f, bool small_pages, int group, bool pair_heads) {
  switch (head_dim) {
    case 64: return choose_bits<T, 64>(f, small_pages, group, pair_heads);
    case 128: return choose_bits<T, 128>(f, small_pages, group, pair_heads);
    case 256: return choose_bits<T, 256>(f, small_pages, group, pair_heads);
  }
  fail(ErrorCode::Unsupported, "quantized decode supports head_dim 64, 128 and 256, not ", head_dim);
}

// The one dispatch point: dtype x head dim x format x (page size a multiple of 16 or not) x (GQA
// group up to 8 or more) x (KV heads paired in a block, where the plan asks and the heads pair up).
KernelChoice choose_kernel(const QuantDecodeParams& p, bool pair_heads) {
  const bool small_pages = p.kv.page_size % 16 != 0;
  const int group = p.shape.num_q_heads / p.shape.num_kv_heads;
  pair_heads = pair_heads && group <= 8 && p.shape.num_kv_heads % 2 == 0;
  switch (p.dtype) {
    case DType::BF16: return choose_dim<__nv_bfloat16>(p.shape.head_dim, p.quant.format, small_pages, group, pair_heads);
    case DType::F16: return choose_dim<__half>(p.shape.head_dim, p.quant.format, small_pages, group, pair_heads);
    default: break;
  }
  fail(ErrorCode::Dtype, "quantized decode supports f16 and bf16, not ", dtype_name(p.dtype));
}

struct Plan {
  KernelChoice k;
  int head_chunks, splits, pages_per_split;
};

// A warp of the main kernel reaches its ring's steady state only after some steps: splits shorter
// than 16 steps per warp cost more in ring fill, merge and partials than they gain once the grid
// already covers every SM (B = 1, L = 32768, H100: 32 splits beat the 64 that fill 4 blocks per SM by
// 6-12%).
constexpr int kSteadySplitTokens = kWarps * 16 * 16;

// The block slots a grid should fill. Warps that copy 2 KB or more per step (fp8, int8, int4 at
// D = 128) keep DRAM as busy with two blocks per SM as with four, and the longer splits of half the
// blocks save ring fills and partials (H100, 16 x 8192, 2 splits vs 4: int4 81.7 vs 90.5 us, fp8
// 105.4 vs 107.7, int8 121.8 vs 123.4); int2's 1.6 KB steps need every slot to hide their latency
// (77.6 vs 73.1 us).
int64_t target_slots(const KernelChoice& k) {
  const int64_t slots = resident_blocks(reinterpret_cast<const void*>(k.decode), k.smem);
  return k.step_bytes >= 2048 ? std::max<int64_t>(1, slots / 2) : slots;
}

// Splits from host-known capacities (plan_splits in decode_common.cuh): whole tiles per split for
// the main kernel, whole pages (as tiles of one page) for the small-page kernel. KV heads pair up
// when the batch alone fills the target slots (no split needed).
Plan make_plan(const QuantDecodeParams& p) {
  Plan plan{choose_kernel(p, false), 0, 1, 1};
  const int group = p.shape.num_q_heads / p.shape.num_kv_heads;
  plan.head_chunks = (group + plan.k.heads_per_block - 1) / plan.k.heads_per_block;
  const bool pairs = p.kv.rows_per_sequence == 1;  // a pair of KV heads shares one table row
  if (pairs && int64_t(p.batch) * p.shape.num_kv_heads * plan.head_chunks >= target_slots(plan.k)) plan.k = choose_kernel(p, true);
  const int64_t max_pages = std::max(1, p.max_pages_per_seq);
  const int64_t max_len = max_pages * p.kv.page_size;
  const int64_t base = int64_t(p.batch) * (p.shape.num_kv_heads / plan.k.kv_heads) * plan.head_chunks;
  const int64_t slots = target_slots(plan.k);
  const int tile = plan.k.tile > 0 ? plan.k.tile : p.kv.page_size;
  plan.splits = plan_splits(base, slots, max_len, tile, 0);
  if (plan.k.tile > 0) {
    int device = 0, sms = 0;
    KV_CUDA(cudaGetDevice(&device));
    KV_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    const int64_t steady_tokens = kSteadySplitTokens / plan.k.kv_heads;  // 16 steps for each warp of a head
    const int64_t steady = std::max((max_len + steady_tokens - 1) / steady_tokens, (sms + base - 1) / base);
    if (steady < plan.splits) plan.splits = plan_splits(base, slots, max_len, tile, static_cast<int>(steady));
  } else {
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
  fill_decode_io(a, p);
  a.k_codes = static_cast<const uint8_t*>(p.quant.k_codes);
  a.v_codes = static_cast<const uint8_t*>(p.quant.v_codes);
  a.k_scale = reinterpret_cast<const __half*>(p.quant.k_scale);
  a.k_min = reinterpret_cast<const __half*>(p.quant.k_min);
  a.v_scale = reinterpret_cast<const __half*>(p.quant.v_scale);
  a.v_min = reinterpret_cast<const __half*>(p.quant.v_min);
  a.k_tail = p.kv.k_pages;
  a.v_tail = p.kv.v_pages;
  a.rows_per_sequence = p.kv.rows_per_sequence;
  a.head_chunks = plan.head_chunks;
  a.num_splits = plan.splits;
  a.pages_per_split = plan.pages_per_split;
  a.value_groups = p.quant.format == QuantFormat::FP8E4M3 ? 1 : p.quant.groups();
  a.log2_group = floor_log2(p.quant.group_size);
  const dim3 grid(p.shape.num_kv_heads / plan.k.kv_heads * plan.head_chunks, plan.splits, p.batch);
  launch_decode_and_merge(plan.k.decode, plan.k.merge, a, grid, plan.k.smem, int64_t(p.batch) * p.shape.num_q_heads,
                          p.shape.head_dim, workspace, has_pdl, stream, "quantized decode");
}

}  // namespace kvflash::cuda
