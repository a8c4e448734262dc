// The attention mass of cached tokens, for the eviction policies. It re-reads K (not V) and only when
// a policy asks, so the decode kernel stays as lean as it is. One block per (page entry, KV head):
// each warp takes a token, keeps its key row in registers, and sums exp(scale q.k - lse) over the
// queries that see it; per page, the warps' sums meet in shared memory in a fixed order
// (deterministic, no atomics).
#include "attention_mass.h"
#include "scalar.cuh"

namespace kvflash::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxChunks = 8;  // D / 32 for D up to 256

// T: the q / page dtype.
template <typename T>
__global__ void __launch_bounds__(kWarps * 32) attention_mass_kernel(const AttentionMassParams p) {
  __shared__ float warp_mass[kWarps];
  const int entry = blockIdx.x, h = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int b = 0, hi = p.batch - 1;  // the sequence owning `entry`
  while (b < hi) {
    const int mid = (b + hi + 1) / 2;
    if (p.kv.indptr[mid] <= entry) b = mid; else hi = mid - 1;
  }
  const int P = p.kv.page_size, D = p.shape.head_dim, H = p.shape.num_q_heads, Hkv = p.shape.num_kv_heads;
  const int group = H / Hkv;
  const int pages = p.kv.indptr[b + 1] - p.kv.indptr[b];
  const int len = (pages - 1) * P + p.kv.last_page_len[b];
  const int first_token = (entry - p.kv.indptr[b]) * P;
  const int valid = min(P, len - first_token);
  const int64_t page = p.kv.indices[entry];
  const int q_begin = p.cu_seqlens_q[b];
  const int num_queries = p.cu_seqlens_q[b + 1] - q_begin;
  const T* queries = static_cast<const T*>(p.q);

  float mass_sum = 0.0f;
  for (int slot = warp; slot < valid; slot += kWarps) {
    const int j = first_token + slot;
    const T* key = static_cast<const T*>(p.kv.k_pages) + ((page * P + slot) * Hkv + h) * D;
    float k[kMaxChunks];
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) k[c] = lane + 32 * c < D ? to_float(key[lane + 32 * c]) : 0.0f;
    float mass = 0.0f;
    for (int i = 0; i < num_queries; ++i) {
      if (p.causal && j > len - num_queries + i) continue;  // uniform across the warp
      for (int g = 0; g < group; ++g) {
        const int64_t row = int64_t(q_begin + i) * H + h * group + g;
        const T* q = queries + row * D;
        float dot = 0.0f;
#pragma unroll
        for (int c = 0; c < kMaxChunks; ++c)
          if (lane + 32 * c < D) dot += to_float(q[lane + 32 * c]) * k[c];
        mass += __expf(warp_sum(dot) * p.scale - p.lse[row]);
      }
    }
    if (p.per_page) {
      mass_sum += mass;
    } else if (lane == 0) {
      p.out[(int64_t(p.token_offsets[b]) + j) * Hkv + h] = mass;
    }
  }
  if (!p.per_page) return;
  if (lane == 0) warp_mass[warp] = mass_sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < kWarps; ++w) total += warp_mass[w];
    p.out[int64_t(entry) * Hkv + h] = total;
  }
}

}  // namespace

void launch_attention_mass(const AttentionMassParams& p, cudaStream_t stream) {
  if (p.nnz == 0) return;
  const dim3 grid(static_cast<unsigned>(p.nnz), static_cast<unsigned>(p.shape.num_kv_heads));
  dispatch_dtype(p.dtype, [&](auto t) { attention_mass_kernel<decltype(t)><<<grid, kWarps * 32, 0, stream>>>(p); });
  check_launch("attention_mass_kernel");
}

}  // namespace kvflash::cuda
