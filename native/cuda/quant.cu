// Quantizing and dequantizing whole pages on the GPU, with the scalar rules of quant_format.h, so
// the bytes equal the CPU reference's. Not on the per-token path (a page is quantized once, when it
// fills), so these kernels favour plainness: one block per (page, KV head), runtime dtype and bits.
#include <cstdint>

#include "../core/element_access.h"
#include "quant.h"

namespace kvflash::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxDim = 256;
constexpr int kMaxValueStats = 256 * (256 / 32);  // P * D/G at most

__device__ float block_max(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  float r = 0.0f;
  for (int w = 0; w < kThreads / 32; ++w) r = fmaxf(r, scratch[w]);
  __syncthreads();
  return r;
}

// Block (i, h): source page src_pages[i], KV head h, into quantized page dst_pages[i]; K then V.
__global__ void __launch_bounds__(kThreads) quantize_kernel(const QuantizeParams p) {
  __shared__ float stat_scale[kMaxValueStats > kMaxDim ? kMaxValueStats : kMaxDim];
  __shared__ float stat_min[kMaxValueStats > kMaxDim ? kMaxValueStats : kMaxDim];
  __shared__ float scratch[kThreads / 32];
  const QuantizedPages& q = p.dst;
  const int i = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
  const int P = q.page_size, H = q.num_kv_heads, D = q.head_dim, bits = q.bits(), levels = (1 << bits) - 1;
  const int64_t src = p.src_pages[i], dst = p.dst_pages[i];
  for (int pass = 0; pass < 2; ++pass) {
    const bool keys = pass == 0;
    const void* base = keys ? p.k_src : p.v_src;
    uint8_t* codes = static_cast<uint8_t*>(keys ? q.k_codes : q.v_codes);
    uint16_t* scales = keys ? q.k_scale : q.v_scale;
    uint16_t* mins = keys ? q.k_min : q.v_min;
    auto x_at = [&](int t, int d) { return quant_sanitize(load_float(p.dtype, base, ((src * P + t) * H + h) * D + d)); };
    auto row = [&](int t) { return codes + ((dst * P + t) * H + h) * q.row_bytes(); };
    if (q.format == QuantFormat::FP8E4M3) {
      float amax = 0.0f;
      for (int e = tid; e < P * D; e += kThreads) amax = fmaxf(amax, fabsf(x_at(e / D, e % D)));
      amax = block_max(amax, scratch);
      const uint16_t sb = fp8_scale_for_amax(amax);
      if (tid == 0) scales[dst * H + h] = sb;
      const float s = f16_bits_to_f32(sb);
      for (int e = tid; e < P * D; e += kThreads) row(e / D)[e % D] = quantize_fp8(x_at(e / D, e % D), s);
      continue;
    }
    const int G = q.group_size, NG = q.groups();
    if (keys) {
      for (int d = tid; d < D; d += kThreads) {
        float lo = INFINITY, hi = -INFINITY;
        for (int t = 0; t < P; ++t) {
          const float x = x_at(t, d);
          lo = fminf(lo, x);
          hi = fmaxf(hi, x);
        }
        const AffineBits a = affine_for_range(lo, hi, levels);
        scales[(dst * H + h) * D + d] = a.scale;
        mins[(dst * H + h) * D + d] = a.min;
        stat_scale[d] = f16_bits_to_f32(a.scale);
        stat_min[d] = f16_bits_to_f32(a.min);
      }
    } else {
      for (int e = tid; e < P * NG; e += kThreads) {
        const int t = e / NG, g = e % NG;
        float lo = INFINITY, hi = -INFINITY;
        for (int d = g * G; d < (g + 1) * G; ++d) {
          const float x = x_at(t, d);
          lo = fminf(lo, x);
          hi = fmaxf(hi, x);
        }
        const AffineBits a = affine_for_range(lo, hi, levels);
        const int64_t at = ((dst * P + t) * H + h) * NG + g;
        scales[at] = a.scale;
        mins[at] = a.min;
        stat_scale[e] = f16_bits_to_f32(a.scale);
        stat_min[e] = f16_bits_to_f32(a.min);
      }
    }
    __syncthreads();
    const int per_byte = 8 / bits, rb = q.row_bytes();
    for (int e = tid; e < P * rb; e += kThreads) {
      const int t = e / rb, byte = e % rb;
      uint32_t packed = 0;
      for (int j = 0; j < per_byte; ++j) {
        const int d = byte * per_byte + j;
        const int si = keys ? d : t * NG + d / G;
        packed |= quantize_int(x_at(t, d), stat_scale[si], stat_min[si], levels) << (j * bits);
      }
      row(t)[byte] = static_cast<uint8_t>(packed);
    }
    __syncthreads();  // the stats are rewritten by the next pass
  }
}

// One thread per element of the output pages.
__global__ void dequantize_kernel(const DequantizeParams p) {
  const QuantizedPages& q = p.src;
  const int P = q.page_size, H = q.num_kv_heads, D = q.head_dim;
  const int64_t per_page = int64_t(P) * H * D;
  const int64_t total = per_page * p.count;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e / per_page;
    const int rem = static_cast<int>(e % per_page);
    const int t = rem / (H * D), h = (rem / D) % H, d = rem % D;
    const int64_t page = p.pages[i];
    const int64_t r = (page * P + t) * H + h;
    float kx, vx;
    if (q.format == QuantFormat::FP8E4M3) {
      kx = dequantize_fp8(static_cast<const uint8_t*>(q.k_codes)[r * D + d], f16_bits_to_f32(q.k_scale[page * H + h]));
      vx = dequantize_fp8(static_cast<const uint8_t*>(q.v_codes)[r * D + d], f16_bits_to_f32(q.v_scale[page * H + h]));
    } else {
      const int bits = q.bits();
      const int64_t ks = (page * H + h) * D + d, vs = r * q.groups() + d / q.group_size;
      kx = dequantize_int(unpack_code(static_cast<const uint8_t*>(q.k_codes) + r * q.row_bytes(), d, bits),
                          f16_bits_to_f32(q.k_scale[ks]), f16_bits_to_f32(q.k_min[ks]));
      vx = dequantize_int(unpack_code(static_cast<const uint8_t*>(q.v_codes) + r * q.row_bytes(), d, bits),
                          f16_bits_to_f32(q.v_scale[vs]), f16_bits_to_f32(q.v_min[vs]));
    }
    store_float(p.dtype, p.k_out, e, kx);
    store_float(p.dtype, p.v_out, e, vx);
  }
}

}  // namespace

void launch_quantize_pages(const QuantizeParams& p, cudaStream_t stream) {
  if (p.count == 0) return;
  KV_CHECK(p.dst.head_dim <= kMaxDim && p.dst.page_size * p.dst.groups() <= kMaxValueStats, Unsupported,
           "quantizePages on a GPU supports head dims up to ", kMaxDim, ", not ", p.dst.head_dim);
  quantize_kernel<<<dim3(p.count, p.dst.num_kv_heads), kThreads, 0, stream>>>(p);
  check_launch("quantize_kernel");
}

void launch_dequantize_pages(const DequantizeParams& p, cudaStream_t stream) {
  const int64_t total = int64_t(p.count) * p.src.page_size * p.src.num_kv_heads * p.src.head_dim;
  if (total == 0) return;
  const int64_t blocks = (total + 255) / 256;
  dequantize_kernel<<<static_cast<unsigned>(blocks < 65536 ? blocks : 65536), 256, 0, stream>>>(p);
  check_launch("dequantize_kernel");
}

}  // namespace kvflash::cuda
