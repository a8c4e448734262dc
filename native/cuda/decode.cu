// Paged flash-decoding. A block owns one (sequence, KV head, split) and every query head of that KV
// head's GQA group, so each K/V row crosses the memory bus once per block. The group's heads are the
// rows of a 16-row tensor-core tile (m16n8k16): a decode step is two tiny matrix products per 16
// tokens, which leaves the CUDA cores free and the kernel bound by memory even at group size 8+.
//
// Data flow: cp.async copies 64-token tiles of K and V (16-byte chunks, page lookups per row) into a
// multi-stage shared-memory ring; warps split each tile's tokens, read it with ldmatrix, and keep an
// online softmax in float32. Warps merge in shared memory at the end. When the grid would not fill
// the GPU, the sequence is split across blocks (split-K) and a second kernel merges the partial
// (out, lse) pairs by their log-sum-exp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include "../core/errors.h"
#include "decode.h"

namespace kvflash::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 64;             // tokens per pipeline stage
constexpr int kMinSplitTokens = 256;  // below this a split costs more in merging than it gains
constexpr int kMaxSplits = 256;
constexpr float kLn2 = 0.69314718055994530942f;

struct DecodeArgs {
  const void* q;
  void* out;
  float* lse;
  float* part_out;  // [B*H, splits, D], only when splits > 1
  float* part_lse;  // [B*H, splits], log2 domain
  const void* k_pages;
  const void* v_pages;
  const int32_t* indptr;
  const int32_t* indices;
  const int32_t* last_page_len;
  int rows_per_sequence;  // 1, or Hkv when each KV head has its own table row (Quest)
  int num_heads, num_kv_heads, group, head_chunks, log2_page, num_splits;
  float scale_log2;  // scale * log2(e): the softmax runs on exp2
};

// ---- PTX wrappers ----------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Copies 16 bytes, or writes 16 zero bytes when !valid (src-size 0 reads nothing): masked rows stay
// finite, so p = 0 times V never makes a NaN.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// The element type's tensor-core product, pair packing and float conversion.
template <typename T>
struct Elem;

template <>
struct Elem<__nv_bfloat16> {
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

template <>
struct Elem<__half> {
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ static uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

// Four floats to four elements in one 8-byte store.
template <typename T>
__device__ __forceinline__ void store4(T* dst, float4 v) {
  uint2 packed = make_uint2(Elem<T>::pack(v.x, v.y), Elem<T>::pack(v.z, v.w));
  *reinterpret_cast<uint2*>(dst) = packed;
}

// Shared-memory rows of D elements, addressed in 16-byte chunks XOR-swizzled by the row's low three
// bits: the 8 rows one ldmatrix phase reads then land in 8 distinct bank groups.
template <int D>
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// ---- the decode kernel -----------------------------------------------------------------------

// T: element type of q, pages and out.
// D: head dimension.
// MTILES: 16-head tiles per block (group sizes up to 16 * MTILES); warps share tiles by splitting tokens.
// STAGES: depth of the cp.async ring.
template <typename T, int D, int MTILES, int STAGES>
__global__ void __launch_bounds__(kThreads) paged_decode_kernel(const DecodeArgs a) {
  constexpr int CPR = D / 8;               // 16-byte chunks per row
  constexpr int ROW_STEP = kThreads / CPR;  // rows the block copies per pass
  constexpr int RPT = kTile / ROW_STEP;     // rows each thread copies per tile
  constexpr int SLICES = kWarps / MTILES;   // warps per head tile, each on its share of the tokens
  constexpr int WARP_TOKENS = kTile / SLICES;
  constexpr int HEADS = 16 * MTILES;
  constexpr int NT = D / 8;  // 8-wide column tiles of the output
  static_assert(WARP_TOKENS % 16 == 0, "a warp consumes whole 16-token steps");

  extern __shared__ __align__(128) unsigned char smem[];
  T* kv_s = reinterpret_cast<T*>(smem);          // [STAGES][K, V][kTile][D]
  T* q_s = kv_s + STAGES * 2 * kTile * D;         // [HEADS][D]

  const int hk = blockIdx.x / a.head_chunks;
  const int head_chunk = blockIdx.x % a.head_chunks;
  const int split = blockIdx.y;
  const int b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Lets the merge grid launch now and wait on-device (it still sees all of this grid's writes).
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
  const int table_row = a.rows_per_sequence == 1 ? b : b * a.rows_per_sequence + hk;
  const int page_begin = a.indptr[table_row];
  const int npages = a.indptr[table_row + 1] - page_begin;
  const int page_size = 1 << a.log2_page;
  const int len = npages > 0 ? (npages - 1) * page_size + a.last_page_len[table_row] : 0;
  // Whole tiles per split, so only the last tile of a sequence is ever partial.
  const int per_split = ((len + a.num_splits - 1) / a.num_splits + kTile - 1) / kTile * kTile;
  const int start = split * per_split;
  const int end = min(len, start + per_split);
  const int ntiles = start < end ? (end - start + kTile - 1) / kTile : 0;

  const int head0 = head_chunk * HEADS;
  const int nheads = min(HEADS, a.group - head0);
  const int qh0 = hk * a.group + head0;

  for (int i = tid; i < HEADS * CPR; i += kThreads) {
    const int r = i / CPR, c = i % CPR;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < nheads) {
      v = *reinterpret_cast<const uint4*>(static_cast<const T*>(a.q) +
                                          (static_cast<int64_t>(b) * a.num_heads + qh0 + r) * D + c * 8);
    }
    *reinterpret_cast<uint4*>(q_s + swz<D>(r, c)) = v;
  }

  // Each thread copies chunk `cc` of rows r0, r0 + ROW_STEP, ...; page ids for the next tile are
  // loaded one iteration early so the copy never waits on the page-table read.
  const int cc = tid % CPR, r0 = tid / CPR;
  const int64_t page_stride = static_cast<int64_t>(page_size) * a.num_kv_heads * D;
  const int64_t row_stride = static_cast<int64_t>(a.num_kv_heads) * D;
  const T* kp = static_cast<const T*>(a.k_pages) + hk * D + cc * 8;
  const T* vp = static_cast<const T*>(a.v_pages) + hk * D + cc * 8;
  const int32_t* seq_pages = a.indices + page_begin;
  int pg[RPT];

  auto load_pages = [&](int tile) {
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      const int pos = start + tile * kTile + r0 + i * ROW_STEP;
      pg[i] = pos < end ? __ldg(seq_pages + (pos >> a.log2_page)) : 0;
    }
  };
  auto issue = [&](int tile, int stage) {
    T* ks = kv_s + stage * 2 * kTile * D;
    T* vs = ks + kTile * D;
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      const int r = r0 + i * ROW_STEP;
      const int pos = start + tile * kTile + r;
      const bool valid = pos < end;
      const int64_t off = valid ? pg[i] * page_stride + (pos & (page_size - 1)) * row_stride : 0;
      const int so = swz<D>(r, cc);
      cp_async16(smem_addr(ks + so), kp + off, valid);
      cp_async16(smem_addr(vs + so), vp + off, valid);
    }
  };

  float o[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY};  // running max of rows lane/4 and lane/4 + 8 (log2 domain)
  float l[2] = {0.f, 0.f};              // this lane's share of the running denominators

  const int mtile = warp % MTILES;
  const int slice = warp / MTILES;
  const uint32_t q_base = smem_addr(q_s);

  load_pages(0);
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ntiles) issue(s, s);
    load_pages(s + 1);
    cp_async_commit();
  }

  for (int t = 0; t < ntiles; ++t) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile t landed for everyone, and everyone is done with the stage refilled next
    const int tn = t + STAGES - 1;
    if (tn < ntiles) issue(tn, tn % STAGES);
    load_pages(tn + 1);
    cp_async_commit();

    const T* ks = kv_s + (t % STAGES) * 2 * kTile * D;
    const uint32_t k_base = smem_addr(ks);
    const uint32_t v_base = smem_addr(ks + kTile * D);

#pragma unroll
    for (int sub = 0; sub < WARP_TOKENS / 16; ++sub) {
      const int tr0 = slice * WARP_TOKENS + sub * 16;  // first tile row of this step
      const int pos0 = start + t * kTile + tr0;
      if (pos0 >= end) break;  // warp-uniform: the rest of the tile is past the sequence

      float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t qa[4], kb[4];
        ldsm_x4(qa, q_base + 2 * swz<D>(mtile * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, kk * 2 + (lane >> 4)));
        ldsm_x4(kb, k_base + 2 * swz<D>(tr0 + (lane & 7) + (lane >> 4) * 8, kk * 2 + ((lane >> 3) & 1)));
        Elem<T>::mma(s[0], qa, kb[0], kb[1]);
        Elem<T>::mma(s[1], qa, kb[2], kb[3]);
      }

      // Lane holds scores of rows lane/4 (e = 0, 1) and lane/4 + 8 (e = 2, 3) for tokens
      // pos0 + j*8 + (lane&3)*2 + (e&1).
      float rmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int pos = pos0 + j * 8 + (lane & 3) * 2 + (e & 1);
          s[j][e] = pos < end ? s[j][e] * a.scale_log2 : -INFINITY;
          rmax[e >> 1] = fmaxf(rmax[e >> 1], s[j][e]);
        }
      }
      float use[2], factor[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        rmax[r] = fmaxf(rmax[r], __shfl_xor_sync(0xffffffffu, rmax[r], 1));
        rmax[r] = fmaxf(rmax[r], __shfl_xor_sync(0xffffffffu, rmax[r], 2));
        const float mn = fmaxf(m[r], rmax[r]);
        use[r] = mn == -INFINITY ? 0.f : mn;  // keeps exp2 of an all-masked row at 0, not NaN
        factor[r] = exp2f(m[r] - use[r]);
        m[r] = mn;
      }
      float p[2][4];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) p[j][e] = exp2f(s[j][e] - use[e >> 1]);
      }
      l[0] = l[0] * factor[0] + (p[0][0] + p[0][1] + p[1][0] + p[1][1]);
      l[1] = l[1] * factor[1] + (p[0][2] + p[0][3] + p[1][2] + p[1][3]);
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        o[n][0] *= factor[0];
        o[n][1] *= factor[0];
        o[n][2] *= factor[1];
        o[n][3] *= factor[1];
      }
      // The score tile's accumulator layout is the A-operand layout of the next product.
      const uint32_t pa[4] = {Elem<T>::pack(p[0][0], p[0][1]), Elem<T>::pack(p[0][2], p[0][3]),
                              Elem<T>::pack(p[1][0], p[1][1]), Elem<T>::pack(p[1][2], p[1][3])};
#pragma unroll
      for (int jj = 0; jj < D / 16; ++jj) {
        uint32_t vb[4];
        ldsm_x4_trans(vb, v_base + 2 * swz<D>(tr0 + (lane & 7) + ((lane >> 3) & 1) * 8, jj * 2 + (lane >> 4)));
        Elem<T>::mma(o[2 * jj], pa, vb[0], vb[1]);
        Elem<T>::mma(o[2 * jj + 1], pa, vb[2], vb[3]);
      }
    }
  }

  // Merge the warps that share a head tile. The ring is free once every copy has landed.
  cp_async_wait<0>();
  __syncthreads();
  float* o_s = reinterpret_cast<float*>(smem);  // [kWarps][16][D]
  float* m_s = o_s + kWarps * 16 * D;           // [kWarps][16]
  float* l_s = m_s + kWarps * 16;               // [kWarps][16]
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  {
    const int g = lane >> 2, c2 = (lane & 3) * 2;
    float* ow = o_s + warp * 16 * D;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      *reinterpret_cast<float2*>(ow + g * D + n * 8 + c2) = make_float2(o[n][0], o[n][1]);
      *reinterpret_cast<float2*>(ow + (g + 8) * D + n * 8 + c2) = make_float2(o[n][2], o[n][3]);
    }
    if ((lane & 3) == 0) {
      m_s[warp * 16 + g] = m[0];
      m_s[warp * 16 + g + 8] = m[1];
      l_s[warp * 16 + g] = l[0];
      l_s[warp * 16 + g + 8] = l[1];
    }
  }
  __syncthreads();

  for (int i = tid; i < nheads * (D / 4); i += kThreads) {
    const int r = i / (D / 4), d = (i % (D / 4)) * 4;
    const int mt = r / 16, rr = r % 16;
    float mx = -INFINITY;
#pragma unroll
    for (int sl = 0; sl < SLICES; ++sl) mx = fmaxf(mx, m_s[(mt + sl * MTILES) * 16 + rr]);
    const float use = mx == -INFINITY ? 0.f : mx;
    float den = 0.f;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int sl = 0; sl < SLICES; ++sl) {
      const int w = mt + sl * MTILES;
      const float f = exp2f(m_s[w * 16 + rr] - use);
      den += f * l_s[w * 16 + rr];
      const float4 v = *reinterpret_cast<const float4*>(o_s + (w * 16 + rr) * D + d);
      acc.x += f * v.x;
      acc.y += f * v.y;
      acc.z += f * v.z;
      acc.w += f * v.w;
    }
    const float inv = den > 0.f ? 1.f / den : 0.f;
    acc.x *= inv;
    acc.y *= inv;
    acc.z *= inv;
    acc.w *= inv;
    const float lse2 = den > 0.f ? use + log2f(den) : -INFINITY;
    const int64_t row = static_cast<int64_t>(b) * a.num_heads + qh0 + r;
    if (a.num_splits == 1) {
      store4(static_cast<T*>(a.out) + row * D + d, acc);
      if (d == 0 && a.lse) a.lse[row] = lse2 * kLn2;
    } else {
      const int64_t slot = row * a.num_splits + split;
      *reinterpret_cast<float4*>(a.part_out + slot * D + d) = acc;
      if (d == 0) a.part_lse[slot] = lse2;
    }
  }
}

// exp2(m - ref), with an empty partial (m = -inf) weighing 0 even when ref is -inf too.
__device__ __forceinline__ float weight(float m, float ref) { return m == -INFINITY ? 0.f : exp2f(m - ref); }

// One block per (sequence, query head): weights each split by exp2(lse_s - max), normalized. The
// block's warps take interleaved batches of splits and lanes own 4 columns each, so the merge costs a
// few L2 round trips rather than one per split; the warps' sums meet in shared memory.
template <typename T>
__global__ void __launch_bounds__(kThreads) merge_splits_kernel(const float* part_out, const float* part_lse,
                                                                void* out, float* lse, int splits, int head_dim) {
  constexpr int kBatch = 8;  // partial rows one warp has in flight
  __shared__ float4 warp_sum[kWarps][256 / 4];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Launched early (programmatic dependent launch): wait here until the decode grid's writes are visible.
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row = blockIdx.x;
  const float* pl = part_lse + row * splits;
  const float* po = part_out + row * splits * head_dim;
  // One pass over the lse values: a running (max, denominator) per lane, then merged across lanes.
  float mx = -INFINITY, den = 0.f;
  for (int s = lane; s < splits; s += 32) {
    const float x = pl[s];
    const float nm = fmaxf(mx, x);
    den = den * weight(mx, nm) + weight(x, nm);
    mx = nm;
  }
#pragma unroll
  for (int k = 16; k > 0; k >>= 1) {
    const float om = __shfl_xor_sync(0xffffffffu, mx, k);
    const float od = __shfl_xor_sync(0xffffffffu, den, k);
    const float nm = fmaxf(mx, om);
    den = den * weight(mx, nm) + od * weight(om, nm);
    mx = nm;
  }
  const float inv = den > 0.f ? 1.f / den : 0.f;
  for (int d0 = 0; d0 < head_dim; d0 += 128) {  // every lane iterates: the shuffles need the whole warp
    const int d = d0 + lane * 4;
    const int dl = d < head_dim ? d : head_dim - 4;  // idle lanes load a valid column; it is never stored
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s0 = warp * kBatch; s0 < splits; s0 += kWarps * kBatch) {
      const int n = min(kBatch, splits - s0);
      const float w_lane = lane < n ? weight(pl[s0 + lane], mx) * inv : 0.f;
      float w[kBatch];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) w[j] = __shfl_sync(0xffffffffu, w_lane, j);
      // Past the last split: a repeat of it, weighted 0, so every load is unconditional.
      float4 v[kBatch];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        v[j] = __ldcg(reinterpret_cast<const float4*>(po + (s0 + min(j, n - 1)) * head_dim + dl));
      }
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        acc.x += w[j] * v[j].x;
        acc.y += w[j] * v[j].y;
        acc.z += w[j] * v[j].z;
        acc.w += w[j] * v[j].w;
      }
    }
    warp_sum[warp][d0 / 4 + lane] = acc;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < head_dim / 4; i += kThreads) {
    float4 t = warp_sum[0][i];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) {
      t.x += warp_sum[w][i].x;
      t.y += warp_sum[w][i].y;
      t.z += warp_sum[w][i].z;
      t.w += warp_sum[w][i].w;
    }
    store4(static_cast<T*>(out) + row * head_dim + i * 4, t);
  }
  if (threadIdx.x == 0 && lse) lse[row] = den > 0.f ? (mx + log2f(den)) * kLn2 : -INFINITY;
}

// ---- host side -------------------------------------------------------------------------------

struct KernelChoice {
  void (*decode)(DecodeArgs);
  void (*merge)(const float*, const float*, void*, float*, int, int);
  int heads_per_block;  // 16 * MTILES
  size_t smem;
};

template <typename T, int D, int MTILES>
KernelChoice make_choice() {
  // Deep enough for ~64 KB of copies in flight per SM at every D, small enough for 2 blocks per SM
  // up to D = 128.
  constexpr int stages = D == 64 ? 4 : D == 128 ? 3 : 2;
  const size_t ring = static_cast<size_t>(stages) * 2 * kTile * D * sizeof(T);
  const size_t q = static_cast<size_t>(16 * MTILES) * D * sizeof(T);
  static_assert(stages * 2 * kTile * D * 2 >= (kWarps * 16 * D + 2 * kWarps * 16) * 4,
                "the warp merge reuses the ring");
  return {paged_decode_kernel<T, D, MTILES, stages>, merge_splits_kernel<T>, 16 * MTILES, ring + q};
}

template <typename T, int D>
KernelChoice choose_mtiles(int group) {
  if (group <= 16) return make_choice<T, D, 1>();
  if (group <= 32) return make_choice<T, D, 2>();
  return make_choice<T, D, 4>();  // larger groups take several blocks of 64 heads
}

template <typename T>
KernelChoice choose_dim(int head_dim, int group) {
  switch (head_dim) {
    case 64: return choose_mtiles<T, 64>(group);
    case 128: return choose_mtiles<T, 128>(group);
    case 256: return choose_mtiles<T, 256>(group);
  }
  fail(ErrorCode::Unsupported, "paged decode supports head_dim 64, 128 and 256, not ", head_dim);
}

// The one dispatch point: dtype x head_dim x group-size bucket.
KernelChoice choose_kernel(const DecodeParams& p) {
  const int group = p.shape.num_q_heads / p.shape.num_kv_heads;
  switch (p.dtype) {
    case DType::BF16: return choose_dim<__nv_bfloat16>(p.shape.head_dim, group);
    case DType::F16: return choose_dim<__half>(p.shape.head_dim, group);
    default: break;
  }
  fail(ErrorCode::Dtype, "paged decode supports f16 and bf16, not ", dtype_name(p.dtype));
}

// Per (device, kernel): raises the shared-memory limit once and caches SMs x resident blocks.
// Also records whether the device has programmatic dependent launch (compute capability 9+).
int resident_blocks(const KernelChoice& k, bool* has_pdl = nullptr) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, std::pair<int, bool>> cache;
  int device = 0;
  KV_CUDA(cudaGetDevice(&device));
  const auto key = std::make_pair(device, reinterpret_cast<const void*>(k.decode));
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it == cache.end()) {
    KV_CUDA(cudaFuncSetAttribute(k.decode, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(k.smem)));
    int sms = 0, per_sm = 0, major = 0;
    KV_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    KV_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    KV_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k.decode, kThreads, k.smem));
    it = cache.emplace(key, std::make_pair(sms * (per_sm > 0 ? per_sm : 1), major >= 9)).first;
  }
  if (has_pdl) *has_pdl = it->second.second;
  return it->second.first;
}

int floor_log2(int x) {
  int r = 0;
  while ((1 << (r + 1)) <= x) ++r;
  return r;
}

struct Plan {
  KernelChoice k;
  int head_chunks;
  int splits;
};

// Splits only from host-known capacities, so one workspace size serves every launch with them.
// Enough splits to give each resident block slot one block (never more: a second wave of
// half-length blocks takes as long as one of full length), each split at least kMinSplitTokens
// and whole tiles.
Plan make_plan(const DecodeParams& p) {
  const int forced_splits = p.splits;
  Plan plan{choose_kernel(p), 0, 1};
  const int group = p.shape.num_q_heads / p.shape.num_kv_heads;
  plan.head_chunks = (group + plan.k.heads_per_block - 1) / plan.k.heads_per_block;
  const int64_t max_len = static_cast<int64_t>(p.max_pages_per_seq) * p.kv.page_size;
  const int64_t tiles = (max_len + kTile - 1) / kTile;
  int64_t splits = 1;
  if (forced_splits > 0) {
    splits = forced_splits;
  } else {
    const int64_t base = static_cast<int64_t>(p.batch) * p.shape.num_kv_heads * plan.head_chunks;
    const int64_t slots = resident_blocks(plan.k);
    splits = base > 0 ? slots / base : 1;
    splits = std::min<int64_t>(splits, (max_len + kMinSplitTokens - 1) / kMinSplitTokens);
  }
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, kMaxSplits, std::max<int64_t>(tiles, 1)}));
  // Equalize: the tiles per split that `splits` implies, and the fewest splits that still covers it.
  const int64_t tiles_per_split = (std::max<int64_t>(tiles, 1) + splits - 1) / splits;
  if (forced_splits <= 0) splits = (std::max<int64_t>(tiles, 1) + tiles_per_split - 1) / tiles_per_split;
  plan.splits = static_cast<int>(splits);
  return plan;
}

size_t workspace_bytes(const DecodeParams& p, const Plan& plan) {
  if (plan.splits <= 1) return 0;
  return static_cast<size_t>(plan.splits) * p.batch * p.shape.num_q_heads * (p.shape.head_dim + 1) * sizeof(float);
}

void launch(const DecodeParams& p, const Plan& plan, void* workspace, cudaStream_t stream) {
  if (p.batch == 0) return;
  KV_CHECK(p.batch <= 65535, Unsupported, "paged decode supports batch up to 65535, not ", p.batch);
  KV_CHECK(p.kv.page_size > 0 && (p.kv.page_size & (p.kv.page_size - 1)) == 0, Shape,
           "Expected a power-of-two page size but received ", p.kv.page_size);
  // 16-byte copies and ldmatrix rows; out takes 8-byte stores, the workspace 16-byte ones.
  const auto aligned = [](const void* ptr, uintptr_t n) { return reinterpret_cast<uintptr_t>(ptr) % n == 0; };
  KV_CHECK(aligned(p.q, 16) && aligned(p.kv.k_pages, 16) && aligned(p.kv.v_pages, 16) && aligned(p.out, 8) &&
               aligned(workspace, 16),
           Unsupported, "paged decode needs 16-byte-aligned q, pages and workspace, and 8-byte-aligned out");
  bool has_pdl = false;
  resident_blocks(plan.k, &has_pdl);  // raises the shared-memory limit before the first launch on a device
  DecodeArgs a{};
  a.q = p.q;
  a.out = p.out;
  a.lse = p.lse;
  a.k_pages = p.kv.k_pages;
  a.v_pages = p.kv.v_pages;
  a.indptr = p.kv.indptr;
  a.indices = p.kv.indices;
  a.last_page_len = p.kv.last_page_len;
  a.rows_per_sequence = p.kv.rows_per_sequence;
  a.num_heads = p.shape.num_q_heads;
  a.num_kv_heads = p.shape.num_kv_heads;
  a.group = p.shape.num_q_heads / p.shape.num_kv_heads;
  a.head_chunks = plan.head_chunks;
  a.log2_page = floor_log2(p.kv.page_size);
  a.num_splits = plan.splits;
  a.scale_log2 = p.scale * 1.44269504088896340736f;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.shape.num_q_heads;
  if (plan.splits > 1) {
    KV_CHECK(workspace != nullptr, Shape, "paged decode needs ", workspace_bytes(p, plan), " bytes of workspace");
    a.part_out = static_cast<float*>(workspace);
    a.part_lse = a.part_out + rows * plan.splits * p.shape.head_dim;
  }
  // Neighbouring blocks are the KV heads of one token range: they read adjacent bytes of each page.
  const dim3 grid(p.shape.num_kv_heads * plan.head_chunks, plan.splits, p.batch);
  plan.k.decode<<<grid, kThreads, plan.k.smem, stream>>>(a);
  check_launch("paged_decode_kernel");
  if (plan.splits > 1) {
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(static_cast<unsigned>(rows));
    config.blockDim = dim3(kThreads);
    config.stream = stream;
    // Hides the merge's launch latency behind the decode's tail.
    cudaLaunchAttribute attr{};
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    config.attrs = &attr;
    config.numAttrs = has_pdl ? 1 : 0;
    KV_CUDA(cudaLaunchKernelEx(&config, plan.k.merge, static_cast<const float*>(a.part_out),
                               static_cast<const float*>(a.part_lse), p.out, p.lse, plan.splits,
                               p.shape.head_dim));
    check_launch("merge_splits_kernel");
  }
}

}  // namespace

size_t paged_decode_workspace_bytes(const DecodeParams& p) { return workspace_bytes(p, make_plan(p)); }

void launch_paged_decode(const DecodeParams& p, void* workspace, cudaStream_t stream) {
  launch(p, make_plan(p), workspace, stream);
}

}  // namespace kvflash::cuda
