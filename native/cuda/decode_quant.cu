// Paged flash-decoding over a quantized layer (formats in native/core/quant_format.h). Codes and
// scales are read straight from the quantized pages and dequantized in registers; the last page of
// each sequence comes from the full-precision tail pool. Nothing is dequantized to memory.
//
// A block owns one (sequence, KV head, split) and up to kHeads query heads of that KV head's GQA
// group, so each quantized row is read once per block. Each warp takes every kWarps-th token of the
// split; a lane owns D/32 consecutive channels of it (their codes are one small aligned load, and a
// value group never straddles lanes since D/32 <= 8 <= G). q.k is a warp reduction per head; each
// warp keeps an online softmax in float32 (exp2 domain) and the warps merge in shared memory at the
// end. Long sequences are split across blocks (whole pages per split) and a second kernel merges the
// partial (out, lse) pairs by their log-sum-exp, as native/cuda/decode.cu does.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>

#include "../core/errors.h"
#include "quant.h"

namespace kvflash::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kHeads = 8;              // query heads per block (larger groups take several blocks)
constexpr int kMinSplitTokens = 256;   // below this a split costs more in merging than it gains
constexpr int kMaxSplits = 256;
constexpr float kLn2 = 0.69314718055994530942f;

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
  int num_heads, num_kv_heads, group, head_chunks, log2_page, num_splits, pages_per_split;
  int value_groups, log2_group;
  float scale_log2;
};

template <typename T>
__device__ __forceinline__ float to_f32(T x);
template <>
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_f32(float x) { return __float2half_rn(x); }

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
    x[c] = to_f32(*reinterpret_cast<const T*>(&bits));
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

// Two f16 (the low and high halves of w) as floats, by the hardware conversion (exact).
__device__ __forceinline__ float2 f16x2_to_f32(uint32_t w) {
  __half2 h;
  memcpy(&h, &w, 4);
  return __half22float2(h);
}

// Two e4m3 codes (the low 16 bits of w) as floats: exact through f16, NaN stays NaN, as
// fp8e4m3_bits_to_f32 defines; one conversion instruction on sm_89 and newer.
__device__ __forceinline__ float2 fp8x2_to_f32(uint32_t w) {
  const __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(w & 0xffffu), __NV_E4M3);
  __half2 h;
  memcpy(&h, &raw, 4);
  return __half22float2(h);
}

// Float of a small unsigned integer code without the (quarter-rate) int-to-float unit: the code
// as the low mantissa bits of 2^23, minus 2^23 (exact).
__device__ __forceinline__ float code_to_f32(uint32_t c) { return __uint_as_float(0x4b000000u | c) - 8388608.f; }

// T: element type of q, out and the tail pool. D: head dimension. BITS: 8, 4, 2 (KIVI integer
// formats) or 0 (fp8e4m3 with a per-(page, head) scale).
//
// A warp takes 32 consecutive tokens at a time. Scores: lane j computes q.k of token j for every
// head of the block, reading its own key row 16 bytes of codes at a time (so a warp max and one
// exp2 per token replace per-token reductions). Values: lanes own D/32 channels and walk the 32
// tokens, with the probabilities broadcast from shared memory four tokens per load.
template <typename T, int D, int BITS>
__global__ void __launch_bounds__(kThreads) quantized_decode_kernel(const QuantDecodeArgs a) {
  constexpr int CH = D / 32;                    // value channels per lane
  constexpr int B = BITS == 0 ? 8 : BITS;       // bits per code
  constexpr int ROW_BYTES = D * B / 8;          // >= 16 for every D and format
  constexpr int UNIT_CH = 16 * 8 / B;           // key channels per 16-byte load of codes
  static_assert(ROW_BYTES % 16 == 0, "rows of whole 16-byte units");
  __shared__ __align__(16) float q_s[kHeads][D];
  __shared__ __align__(16) float o_s[kWarps][kHeads][D];
  __shared__ __align__(16) float p_s[kWarps][kHeads][32];
  __shared__ float m_s[kWarps][kHeads], l_s[kWarps][kHeads];

  const int hk = blockIdx.x / a.head_chunks;
  const int head0 = (blockIdx.x % a.head_chunks) * kHeads;
  const int split = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int nheads = min(kHeads, a.group - head0);
  const int qh0 = hk * a.group + head0;

  for (int i = tid; i < kHeads * D; i += kThreads) {
    const int r = i / D, d = i % D;
    q_s[r][d] = r < nheads ? to_f32(static_cast<const T*>(a.q)[(int64_t(b) * a.num_heads + qh0 + r) * D + d]) * a.scale_log2
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
            const float2 x = fp8x2_to_f32(w[i / 4] >> (8 * (i % 4)));
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
              const float2 sf = f16x2_to_f32(scw[i / 2]), mf = f16x2_to_f32(mnw[i / 2]);
#pragma unroll
              for (int i2 = 0; i2 < 2; ++i2) {
                const int ch = e * 8 + i + i2;  // channel within the unit
                const uint32_t code = (w[(ch * B) >> 5] >> ((ch * B) & 31)) & ((1u << B) - 1u);
                k[ch] = fmaf(code_to_f32(code), i2 ? sf.y : sf.x, i2 ? mf.y : mf.x);
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
              const float2 x = fp8x2_to_f32(vc[c] | (vc[c + 1] << 8));
              v[c] = x.x;
              v[c + 1] = x.y;
            }
          } else {
            const int64_t vs = rj * a.value_groups + (c0 >> a.log2_group);
            vscale = __half2float(a.v_scale[vs]);
            vmin = __half2float(a.v_min[vs]);
#pragma unroll
            for (int c = 0; c < CH; ++c) v[c] = code_to_f32(vc[c]);
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
      static_cast<T*>(a.out)[row * D + d] = from_f32<T>(o);
      if (d == 0 && a.lse) a.lse[row] = lse2 * kLn2;
    } else {
      const int64_t at = row * a.num_splits + split;
      a.part_out[at * D + d] = o;
      if (d == 0) a.part_lse[at] = lse2;
    }
  }
}

// One block per (sequence, query head): weights each split by exp2(lse_s - max), normalized.
template <typename T>
__global__ void __launch_bounds__(kThreads) merge_kernel(const float* part_out, const float* part_lse, void* out,
                                                         float* lse, int splits, int head_dim) {
  const int64_t row = blockIdx.x;
  const float* pl = part_lse + row * splits;
  const float* po = part_out + row * splits * head_dim;
  float mx = -INFINITY;
  for (int s = 0; s < splits; ++s) mx = fmaxf(mx, pl[s]);
  const float use = mx == -INFINITY ? 0.f : mx;
  float den = 0.f;
  for (int s = 0; s < splits; ++s) den += exp2f(pl[s] - use);
  const float inv = den > 0.f ? 1.f / den : 0.f;
  for (int d = threadIdx.x; d < head_dim; d += kThreads) {
    float o = 0.f;
    for (int s = 0; s < splits; ++s) o += exp2f(pl[s] - use) * po[s * head_dim + d];
    static_cast<T*>(out)[row * head_dim + d] = from_f32<T>(o * inv);
  }
  if (threadIdx.x == 0 && lse) lse[row] = den > 0.f ? (use + log2f(den)) * kLn2 : -INFINITY;
}

// ---- host side -------------------------------------------------------------------------------

struct Kernels {
  void (*decode)(QuantDecodeArgs);
  void (*merge)(const float*, const float*, void*, float*, int, int);
};

template <typename T, int D>
Kernels choose_bits(QuantFormat f) {
  switch (f) {
    case QuantFormat::FP8E4M3: return {quantized_decode_kernel<T, D, 0>, merge_kernel<T>};
    case QuantFormat::INT8: return {quantized_decode_kernel<T, D, 8>, merge_kernel<T>};
    case QuantFormat::INT4: return {quantized_decode_kernel<T, D, 4>, merge_kernel<T>};
    case QuantFormat::INT2: return {quantized_decode_kernel<T, D, 2>, merge_kernel<T>};
  }
  fail(ErrorCode::Unsupported, "unknown quantized format");
}

template <typename T>
Kernels choose_dim(int head_dim, QuantFormat f) {
  switch (head_dim) {
    case 64: return choose_bits<T, 64>(f);
    case 128: return choose_bits<T, 128>(f);
    case 256: return choose_bits<T, 256>(f);
  }
  fail(ErrorCode::Unsupported, "quantized decode supports head_dim 64, 128 and 256, not ", head_dim);
}

// The one dispatch point: dtype x head dim x format.
Kernels choose_kernels(const QuantDecodeParams& p) {
  switch (p.dtype) {
    case DType::BF16: return choose_dim<__nv_bfloat16>(p.shape.head_dim, p.quant.format);
    case DType::F16: return choose_dim<__half>(p.shape.head_dim, p.quant.format);
    default: break;
  }
  fail(ErrorCode::Dtype, "quantized decode supports f16 and bf16, not ", dtype_name(p.dtype));
}

// SMs x resident blocks of a kernel, per (device, kernel).
int resident_blocks(const void* kernel) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, int> cache;
  int device = 0;
  KV_CUDA(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find({device, kernel});
  if (it == cache.end()) {
    int sms = 0, per_sm = 0;
    KV_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    KV_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
    it = cache.emplace(std::make_pair(device, kernel), sms * std::max(per_sm, 1)).first;
  }
  return it->second;
}

int floor_log2(int x) {
  int r = 0;
  while ((1 << (r + 1)) <= x) ++r;
  return r;
}

struct Plan {
  Kernels k;
  int head_chunks, splits, pages_per_split;
};

// From host-known capacities only (batch, heads, max pages), so one workspace size serves every
// launch with them: enough splits to fill the resident block slots once, each at least
// kMinSplitTokens of whole pages.
Plan make_plan(const QuantDecodeParams& p) {
  Plan plan{choose_kernels(p), 0, 1, 1};
  const int group = p.shape.num_q_heads / p.shape.num_kv_heads;
  plan.head_chunks = (group + kHeads - 1) / kHeads;
  const int64_t max_pages = std::max(1, p.max_pages_per_seq);
  const int64_t base = int64_t(p.batch) * p.shape.num_kv_heads * plan.head_chunks;
  const int64_t slots = resident_blocks(reinterpret_cast<const void*>(plan.k.decode));
  const int64_t min_pages = std::max<int64_t>(1, kMinSplitTokens / p.kv.page_size);
  int64_t splits = base > 0 ? slots / base : 1;
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, kMaxSplits, (max_pages + min_pages - 1) / min_pages}));
  const int64_t per_split = (max_pages + splits - 1) / splits;
  plan.pages_per_split = static_cast<int>(per_split);
  plan.splits = static_cast<int>((max_pages + per_split - 1) / per_split);
  return plan;
}

size_t workspace_bytes(const QuantDecodeParams& p, const Plan& plan) {
  if (plan.splits <= 1) return 0;
  return size_t(plan.splits) * p.batch * p.shape.num_q_heads * (p.shape.head_dim + 1) * sizeof(float);
}

}  // namespace

size_t quantized_decode_workspace_bytes(const QuantDecodeParams& p) {
  return p.batch == 0 ? 0 : workspace_bytes(p, make_plan(p));
}

void launch_quantized_paged_decode(const QuantDecodeParams& p, void* workspace, cudaStream_t stream) {
  if (p.batch == 0) return;
  KV_CHECK(p.batch <= 65535, Unsupported, "quantized decode supports batch up to 65535, not ", p.batch);
  const Plan plan = make_plan(p);
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
  const int64_t rows = int64_t(p.batch) * p.shape.num_q_heads;
  if (plan.splits > 1) {
    KV_CHECK(workspace != nullptr, Shape, "quantized decode needs ", workspace_bytes(p, plan), " bytes of workspace");
    a.part_out = static_cast<float*>(workspace);
    a.part_lse = a.part_out + rows * plan.splits * p.shape.head_dim;
  }
  const dim3 grid(p.shape.num_kv_heads * plan.head_chunks, plan.splits, p.batch);
  plan.k.decode<<<grid, kThreads, 0, stream>>>(a);
  check_launch("quantized_decode_kernel");
  if (plan.splits > 1) {
    plan.k.merge<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(a.part_out, a.part_lse, p.out, p.lse,
                                                                          plan.splits, p.shape.head_dim);
    check_launch("quantized_merge_kernel");
  }
}

}  // namespace kvflash::cuda
