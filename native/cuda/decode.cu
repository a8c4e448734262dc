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
#include "decode.h"
#include "decode_common.cuh"

namespace kvflash::cuda {
namespace {

constexpr int kTile = 64;  // tokens per pipeline stage

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

  // Launched early (programmatic): nothing above reads memory.
  wait_for_previous_grid();
  // Lets the merge grid launch now and wait on-device (it still sees all of this grid's writes).
  launch_dependents();
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

      uint32_t pa[4];
      softmax_step<T, NT>(s, pos0, end, a.scale_log2, m, l, o, pa);
#pragma unroll
      for (int jj = 0; jj < D / 16; ++jj) {
        uint32_t vb[4];
        ldsm_x4_trans(vb, v_base + 2 * swz<D>(tr0 + (lane & 7) + ((lane >> 3) & 1) * 8, jj * 2 + (lane >> 4)));
        Elem<T>::mma(o[2 * jj], pa, vb[0], vb[1]);
        Elem<T>::mma(o[2 * jj + 1], pa, vb[2], vb[3]);
      }
    }
  }

  // Merge the warps that share a head tile; fragment columns hold channels in order.
  finish_block<T, D, SLICES, MTILES>(smem, o, m, l, [](int n, int c) { return n * 8 + c; }, nheads,
                                     static_cast<int64_t>(b) * a.num_heads + qh0, split, a.num_splits, a.out,
                                     a.lse, a.part_out, a.part_lse);
}

// ---- host side -------------------------------------------------------------------------------

struct KernelChoice {
  void (*decode)(DecodeArgs);
  MergeLauncher merge;
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
  return {paged_decode_kernel<T, D, MTILES, stages>, launch_merge<T>, 16 * MTILES, ring + q};
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

struct Plan {
  KernelChoice k;
  int head_chunks;
  int splits;
};

// Splits from host-known capacities (plan_splits in decode_common.cuh).
Plan make_plan(const DecodeParams& p) {
  Plan plan{choose_kernel(p), 0, 1};
  const int group = p.shape.num_q_heads / p.shape.num_kv_heads;
  plan.head_chunks = (group + plan.k.heads_per_block - 1) / plan.k.heads_per_block;
  const int64_t max_len = static_cast<int64_t>(p.max_pages_per_seq) * p.kv.page_size;
  const int64_t base = static_cast<int64_t>(p.batch) * p.shape.num_kv_heads * plan.head_chunks;
  // Slots are only read when the count is not forced.
  const int64_t slots = p.splits > 0 ? 0 : resident_blocks(reinterpret_cast<const void*>(plan.k.decode), plan.k.smem);
  plan.splits = plan_splits(base, slots, max_len, kTile, p.splits);
  return plan;
}

size_t workspace_bytes(const DecodeParams& p, const Plan& plan) {
  return split_workspace_bytes(plan.splits, static_cast<int64_t>(p.batch) * p.shape.num_q_heads, p.shape.head_dim);
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
  // Raises the shared-memory limit before the first launch on a device.
  resident_blocks(reinterpret_cast<const void*>(plan.k.decode), plan.k.smem, &has_pdl);
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
  // Neighbouring blocks are the KV heads of one token range: they read adjacent bytes of each page.
  const dim3 grid(p.shape.num_kv_heads * plan.head_chunks, plan.splits, p.batch);
  launch_decode_and_merge(plan.k.decode, plan.k.merge, a, grid, plan.k.smem,
                          static_cast<int64_t>(p.batch) * p.shape.num_q_heads, p.shape.head_dim, workspace, has_pdl,
                          stream, "paged decode");
}

}  // namespace

size_t paged_decode_workspace_bytes(const DecodeParams& p) { return workspace_bytes(p, make_plan(p)); }

void launch_paged_decode(const DecodeParams& p, void* workspace, cudaStream_t stream) {
  launch(p, make_plan(p), workspace, stream);
}

}  // namespace kvflash::cuda
