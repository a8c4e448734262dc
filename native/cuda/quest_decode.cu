// Quest's whole decode step in one kernel: page bounds, the per-KV-head top-k and the sparse decode
// over it, with the split merge folded in. At B=1 each stage alone is a few microseconds of latency
// (a launch, a dependent round trip, a barrier chain), so the stages share one grid instead of
// four: the S blocks of a (sequence, KV head) row each bound a slice of the row's pages, meet once
// at a counter in global memory, each stage the row's (key, page id) pairs in shared memory and
// find the row's threshold themselves (no second meeting), decode their share of the selected
// pages, and the last block of the row to finish merges the row's S partial outputs. Blocks of a
// row wait for each other only when the grid fits the GPU at once (S > 1 only then), so the wait
// cannot deadlock.
//
// Where the time goes (H100, B=1, 32K tokens, 2048-token budget, S = 16, 8 warps; globaltimer stamps):
// the first block starts 1.5 us after the previous kernel; bounding the 8.4 MB of metadata ends at
// 7.4-7.9 us, the row counter at 8.5-9.0, the selection at 12.0-13.8 (each barrier-separated step
// costs 0.3-1.5 us), the partial outputs at 17.4-19.2, the merge at 20.0-21.3. The decode is not
// waiting on DRAM: asking L2 for each slice's likely pages (rank estimated within the slice) while
// the row meets left it as long and delayed the meeting by 1-1.5 us (measured 26.8 us against 24.6).
// The floor under this design is the memory traffic alone: bench/probes/quest-floor.cu moves the
// same bytes in the same order with no arithmetic in 12.3 us (events included) against our 22.5.
#include <algorithm>
#include <tuple>

#include "quest_bounds.cuh"
#include "quest_decode.h"
#include "quest_select.cuh"

namespace kvflash::cuda {
namespace {

// Page ids one block decodes at most (its shared-memory list).
constexpr int kListPages = 1024;
// Depth of each warp's K/V ring, in 16-token steps. With 8 warps a block's share of pages is one or
// two steps a warp, and a second stage measured no faster (H100, 32K and 128K tokens, budgets 1024 to
// 4096); one stage keeps the kernel within 99 KB of shared memory at D <= 128 (sm_86, sm_89).
constexpr int kWarpStages = 1;
// Query heads one block decodes (one m16 tile): larger GQA groups run the three ops instead.
constexpr int kMaxGroup = 16;
// Candidates of a row at most (8193 pages): their (key, page id) pairs fill 64 KB of the work area.
constexpr int kMaxCandidates = 8192;
// Warps of a block: the selection and decode phases are chains of dependent steps over the row's
// candidates and the block's pages, so more warps shorten each (H100, B=1, D=128: 8 warps took 32K
// tokens from 24.7 to 23.7 us and 128K from 44.5 to 38.1 at a 2048-token budget). D = 256 keeps 4:
// its tiles are twice as large, and 8 warps were not measured there.
template <int D>
constexpr int kQuestWarps = D == 256 ? 4 : 8;
constexpr int kMostQuestWarps = 8;  // sizes the per-warp arrays of PhaseShared
// Splits per row at most, unless forced: more blocks bound faster, but each split adds a partial to
// the merge and repeats the selection (measured at 32K tokens, B=1: 16 beat 8, 24 and 33).
constexpr int kMaxAutoSplits = 16;

struct QuestDecodeArgs : DecodeIO {
  const void* k_pages;
  const void* v_pages;
  const void* meta;
  uint2* candidates;    // [rows][candidate_stride]: (order key, page id) of each row's candidates
  uint2* slice_ranges;  // [rows][splits]: the (lowest, highest) key of each split's slice
  unsigned* counters;   // [rows][2]: splits done bounding, splits done decoding; zero between launches
  int candidate_stride;
  int budget;
};

// What the phases keep in shared memory besides their arrays.
struct PhaseShared {
  SelectShared select;
  uint32_t warp_lo[kMostQuestWarps], warp_hi[kMostQuestWarps];
  int last_split;
};

// Byte offsets into the kernel's shared memory. The work area serves each phase in turn: the
// bounds' queries and metadata ring, then the warps' K/V rings, then the warps' partial outputs.
template <int D>
struct Layout {
  static constexpr int kWarps = kQuestWarps<D>;
  static constexpr int kBounds = 16 * 2 * D * 2 + 2 * 32768;
  static constexpr int kDecode = kWarps * kWarpStages * 2 * 16 * D * 2;
  static constexpr int kFinish = (kWarps * 16 * D + 2 * kWarps * 16) * 4;
  static constexpr int kWork = std::max({kBounds, kDecode, kFinish, kMaxCandidates * 8});
  static constexpr int kHist = kWork;                          // the histogram, first the slice's page ids
  static constexpr int kQuery = kHist + kSelectBins * 4;       // the decode's query tile [16][D]
  static constexpr int kList = kQuery + 16 * D * 2;            // the block's selected page ids
  static constexpr int kPhase = kList + kListPages * 4;
  static constexpr int kBytes = kPhase + static_cast<int>(sizeof(PhaseShared));
};

// Counts a split in, releasing the block's writes (ordered before it by a barrier, as in CUTLASS's
// semaphores) to whoever acquires the count; returns the count before.
__device__ __forceinline__ unsigned arrive_release(unsigned* counter) {
  unsigned old;
  asm volatile("atom.release.gpu.global.add.u32 %0, [%1], 1;\n" : "=r"(old) : "l"(counter) : "memory");
  return old;
}

// The same, also acquiring the writes of the splits counted in before.
__device__ __forceinline__ unsigned arrive_acq_rel(unsigned* counter) {
  unsigned old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;\n" : "=r"(old) : "l"(counter) : "memory");
  return old;
}

__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// The last split of a row: each partial weighs exp2(its lse - the max), folded in batches of 16
// splits whose loads are all in flight at once (each batch is a dependent L2 round trip). A batch
// takes its own max first, so its 16 weights are independent of each other (the running max
// rescales the sum once a batch, not once a split).
template <typename T, int D>
__device__ __forceinline__ void merge_row(const QuestDecodeArgs& a, int b, int h, int splits) {
  constexpr int kBatch = 16;
  for (int i = threadIdx.x; i < a.group * (D / 4); i += kQuestWarps<D> * 32) {
    const int r = i / (D / 4), d = (i % (D / 4)) * 4;
    const int64_t qrow = static_cast<int64_t>(b) * a.num_heads + h * a.group + r;
    const float* pl = a.part_lse + qrow * splits;
    const float* po = a.part_out + qrow * splits * D + d;
    float mx = -INFINITY, den = 0.f;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s0 = 0; s0 < splits; s0 += kBatch) {
      float x[kBatch];
      float4 v[kBatch];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const int s = min(s0 + j, splits - 1);  // past the end: a repeat, weighted 0
        x[j] = s0 + j < splits ? __ldcg(pl + s) : -INFINITY;
        v[j] = __ldcg(reinterpret_cast<const float4*>(po + static_cast<int64_t>(s) * D));
      }
      float nm = mx;
#pragma unroll
      for (int j = 0; j < kBatch; ++j) nm = fmaxf(nm, x[j]);
      const float old_w = weight(mx, nm);
      den *= old_w;
      acc = make_float4(acc.x * old_w, acc.y * old_w, acc.z * old_w, acc.w * old_w);
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const float w = weight(x[j], nm);
        den += w;
        acc.x += v[j].x * w;
        acc.y += v[j].y * w;
        acc.z += v[j].z * w;
        acc.w += v[j].w * w;
      }
      mx = nm;
    }
    const float inv = den > 0.f ? 1.f / den : 0.f;
    store4(static_cast<T*>(a.out) + qrow * D + d, make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv));
    if (d == 0 && a.lse) a.lse[qrow] = den > 0.f ? (mx + log2f(den)) * kLn2 : -INFINITY;
  }
}

// Grid (splits, Hkv, B); kQuestWarps<D> warps. T: element type; D: head dim.
template <typename T, int D>
__global__ void __launch_bounds__(kQuestWarps<D> * 32) quest_decode_kernel(const QuestDecodeArgs a) {
  using L = Layout<D>;
  constexpr int WARPS = kQuestWarps<D>, THREADS = WARPS * 32;
  constexpr int NT = D / 8;  // 8-wide column tiles of the output
  extern __shared__ __align__(128) unsigned char smem[];
  int* hist = reinterpret_cast<int*>(smem + L::kHist);
  T* q_tile = reinterpret_cast<T*>(smem + L::kQuery);
  int32_t* list = reinterpret_cast<int32_t*>(smem + L::kList);
  PhaseShared& sh = *reinterpret_cast<PhaseShared*>(smem + L::kPhase);

  const int split = blockIdx.x, splits = gridDim.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int row = b * a.num_kv_heads + h;
  // Launched early (programmatic): nothing above reads memory.
  wait_for_previous_grid();

  const int32_t begin = a.indptr[b];
  const int n = a.indptr[b + 1] - begin;
  const int last_len = a.last_page_len[b];
  const bool selects = n > a.budget;
  const int32_t last_page = a.indices[begin + n - 1];  // loaded now, needed after the selection
  const int kept = selects ? a.budget : n;  // pages the row decodes
  // This split decodes the kept pages ranked r0 .. r1 - 1 in page order.
  const int r0 = static_cast<int>(static_cast<int64_t>(split) * kept / splits);
  const int r1 = static_cast<int>(static_cast<int64_t>(split + 1) * kept / splits);
  const T* q = static_cast<const T*>(a.q) + (static_cast<int64_t>(b) * a.num_heads + h * a.group) * D;

  for (int i = tid; i < 16 * (D / 8); i += THREADS) {
    const int r = i / (D / 8), c = i % (D / 8);
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (r < a.group) v = *reinterpret_cast<const uint4*>(q + r * D + c * 8);
    *reinterpret_cast<uint4*>(q_tile + swz<D>(r, c)) = v;
  }

  if (selects && a.budget > 1) {
    // ---- bounds of this split's slice of the candidates (every page but the last) ----
    const int candidates = n - 1;
    const int c0 = static_cast<int>(static_cast<int64_t>(split) * candidates / splits);
    const int count = static_cast<int>(static_cast<int64_t>(split + 1) * candidates / splits) - c0;
    int32_t* slice_ids = hist;
    T* queries = reinterpret_cast<T*>(smem);
    stage_bound_queries<T, D, WARPS>(q, a.group, 16, queries);
    for (int i = tid; i < count; i += THREADS) slice_ids[i] = a.indices[begin + c0 + i];
    __syncthreads();
    uint2* row_candidates = a.candidates + static_cast<int64_t>(row) * a.candidate_stride;
    uint32_t lo = ~0u, hi = 0u;
    bound_pages<T, D, WARPS>(static_cast<const T*>(a.meta), a.num_kv_heads, h, slice_ids, count, smem_addr(queries), 1,
                             a.group, queries + 16 * 2 * D, [&](int i, float bound) {
                               const uint32_t key = order_key(bound);
                               row_candidates[c0 + i] = make_uint2(key, static_cast<uint32_t>(slice_ids[i]));
                               lo = min(lo, key);
                               hi = max(hi, key);
                             });
    // bound_pages ended at a barrier: the ids are dead, the histogram's memory is free.
    lo = __reduce_min_sync(0xffffffffu, lo);
    hi = __reduce_max_sync(0xffffffffu, hi);
    if (lane == 0) sh.warp_lo[warp] = lo, sh.warp_hi[warp] = hi;
    for (int i = tid; i < kSelectBins / 4; i += THREADS) reinterpret_cast<int4*>(hist)[i] = make_int4(0, 0, 0, 0);
    __syncthreads();
    if (tid == 0) {
#pragma unroll
      for (int w = 0; w < WARPS; ++w) lo = min(lo, sh.warp_lo[w]), hi = max(hi, sh.warp_hi[w]);
      a.slice_ranges[row * splits + split] = make_uint2(lo, hi);
      if (splits > 1) {
        unsigned* bounded = a.counters + 2 * row;
        arrive_release(bounded);
        while (load_acquire(bounded) < static_cast<unsigned>(splits)) {
        }
      }
    }
    __syncthreads();

    // ---- the row's threshold, found by every split alike ----
    // The row's (key, page id) pairs into the work area (free between bounding and decoding), while
    // the slices' key ranges are read.
    uint2* pairs = reinterpret_cast<uint2*>(smem);
    for (int i = tid; i < (candidates + 1) / 2; i += THREADS) {
      cp_async16(smem_addr(pairs + 2 * i), row_candidates + 2 * i, true);
    }
    cp_async_commit();
    lo = ~0u, hi = 0u;
    for (int s = lane; s < splits; s += 32) {
      const uint2 range = __ldcg(a.slice_ranges + row * splits + s);
      lo = min(lo, range.x);
      hi = max(hi, range.y);
    }
    lo = __reduce_min_sync(0xffffffffu, lo);
    hi = __reduce_max_sync(0xffffffffu, hi);
    cp_async_wait<0>();
    __syncthreads();
    const Threshold th = select_threshold<WARPS>(pairs, candidates, a.budget - 1, lo, hi, hist, sh.select);
    place_taken<WARPS>(pairs, candidates, th, sh.select.warp_totals, [&](int j, int slot) {
      if (slot >= r0 && slot < r1) list[slot - r0] = static_cast<int32_t>(pairs[j].y);
    });
  } else if (!selects) {
    for (int i = tid; i < r1 - r0; i += THREADS) list[i] = a.indices[begin + r0 + i];
  }
  // The last page is always kept, ranked last.
  if (selects && tid == 0 && r1 == kept) list[kept - 1 - r0] = last_page;
  __syncthreads();  // the list is complete, the pairs read: the work area is the decode's

  // ---- sparse decode: warp w takes the 16-token steps w, w + 4, ... of the block's tokens ----
  const int page_size = 1 << a.log2_page;
  const int tokens = r1 > r0 ? (r1 - r0) * page_size - (r1 == kept ? page_size - last_len : 0) : 0;
  const int steps = (tokens + 15) / 16;
  constexpr int CPR = D / 8;                   // 16-byte chunks of a row
  constexpr int ROWS = CPR >= 32 ? 1 : 32 / CPR;  // rows a warp copies per pass
  const int cc = lane % CPR, rr = lane / CPR;
  const int64_t row_stride = static_cast<int64_t>(a.num_kv_heads) * D;
  const T* kp = static_cast<const T*>(a.k_pages) + h * D + cc * 8;
  const T* vp = static_cast<const T*>(a.v_pages) + h * D + cc * 8;
  T* ring = reinterpret_cast<T*>(smem) + warp * kWarpStages * 2 * 16 * D;  // per stage: 16 K rows, 16 V rows
  auto issue = [&](int step, int stage) {
    T* ks = ring + stage * 2 * 16 * D;
    T* vs = ks + 16 * D;
#pragma unroll
    for (int i = 0; i < 16 / ROWS; ++i) {
      const int r = rr + i * ROWS;
      const int t = step * 16 + r;
      const bool valid = t < tokens;
      const int64_t off =
          valid ? (static_cast<int64_t>(list[t >> a.log2_page]) * page_size + (t & (page_size - 1))) * row_stride : 0;
      cp_async16(smem_addr(ks + swz<D>(r, cc)), kp + off, valid);
      cp_async16(smem_addr(vs + swz<D>(r, cc)), vp + off, valid);
    }
  };

  float o[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.f, 0.f};
  const uint32_t q_base = smem_addr(q_tile);
#pragma unroll
  for (int s = 0; s < kWarpStages; ++s) {
    if (warp + s * WARPS < steps) issue(warp + s * WARPS, s);
    cp_async_commit();
  }
  for (int it = 0; warp + it * WARPS < steps; ++it) {
    const int step = warp + it * WARPS, stage = it % kWarpStages;
    cp_async_wait<kWarpStages - 1>();
    __syncwarp();
    const uint32_t k_base = smem_addr(ring + stage * 2 * 16 * D);
    const uint32_t v_base = k_base + 16 * D * 2;
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qa[4], kb[4];
      ldsm_x4(qa, q_base + 2 * swz<D>((lane & 7) + ((lane >> 3) & 1) * 8, kk * 2 + (lane >> 4)));
      ldsm_x4(kb, k_base + 2 * swz<D>((lane & 7) + (lane >> 4) * 8, kk * 2 + ((lane >> 3) & 1)));
      Elem<T>::mma(s[0], qa, kb[0], kb[1]);
      Elem<T>::mma(s[1], qa, kb[2], kb[3]);
    }
    uint32_t pa[4];
    softmax_step<T, NT>(s, step * 16, tokens, a.scale_log2, m, l, o, pa);
#pragma unroll
    for (int jj = 0; jj < D / 16; ++jj) {
      uint32_t vb[4];
      ldsm_x4_trans(vb, v_base + 2 * swz<D>((lane & 7) + ((lane >> 3) & 1) * 8, jj * 2 + (lane >> 4)));
      Elem<T>::mma(o[2 * jj], pa, vb[0], vb[1]);
      Elem<T>::mma(o[2 * jj + 1], pa, vb[2], vb[3]);
    }
    __syncwarp();  // every lane is done with the stage before it is refilled
    const int next = step + kWarpStages * WARPS;
    if (next < steps) issue(next, stage);
    cp_async_commit();
  }

  finish_block<T, D, WARPS, 1>(smem, o, m, l, [](int j, int c) { return j * 8 + c; }, a.group,
                                static_cast<int64_t>(b) * a.num_heads + h * a.group, split, splits, a.out, a.lse,
                                a.part_out, a.part_lse);
  if (splits == 1) return;

  // ---- the row's last split to finish merges the partials ----
  __syncthreads();  // every partial of this block is written
  if (tid == 0) {
    sh.last_split = arrive_acq_rel(a.counters + 2 * row + 1) == static_cast<unsigned>(splits - 1);
    if (sh.last_split) {
      a.counters[2 * row] = 0;  // every split of the row is past its wait: ready for the next launch
      a.counters[2 * row + 1] = 0;
    }
  }
  __syncthreads();
  if (sh.last_split) merge_row<T, D>(a, b, h, splits);
}

// ---- host side -------------------------------------------------------------------------------

using Kernel = void (*)(QuestDecodeArgs);

struct Plan {
  bool fused;
  Kernel kernel;
  size_t smem;
  int threads;
  int splits;
  int candidate_stride;
};

template <typename T>
std::tuple<Kernel, size_t, int> choose_dim(int head_dim) {
  switch (head_dim) {
    case 64: return {quest_decode_kernel<T, 64>, Layout<64>::kBytes, kQuestWarps<64> * 32};
    case 128: return {quest_decode_kernel<T, 128>, Layout<128>::kBytes, kQuestWarps<128> * 32};
    default: return {quest_decode_kernel<T, 256>, Layout<256>::kBytes, kQuestWarps<256> * 32};
  }
}

Plan make_plan(const QuestDecodeParams& p) {
  Plan plan{};
  const int group = p.shape.num_q_heads / p.shape.num_kv_heads;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.shape.num_kv_heads;
  const int candidates = std::max(p.max_pages_per_seq - 1, 1);
  const int kept = std::min(p.max_pages_per_seq, p.budget);
  const int d = p.shape.head_dim;
  plan.fused = group <= kMaxGroup && (d == 64 || d == 128 || d == 256) && candidates <= kMaxCandidates &&
               (p.dtype == DType::BF16 || p.dtype == DType::F16);
  if (!plan.fused) return plan;
  std::tie(plan.kernel, plan.smem, plan.threads) =
      p.dtype == DType::BF16 ? choose_dim<__nv_bfloat16>(d) : choose_dim<__half>(d);
  // Parts with less shared memory a block (sm_86 and sm_89: 99 KB) run the three ops instead.
  int device = 0, smem_limit = 0;
  KV_CUDA(cudaGetDevice(&device));
  KV_CUDA(cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  plan.fused = plan.smem <= static_cast<size_t>(smem_limit);
  if (!plan.fused) return plan;
  // Splits wait for each other: only as many as the GPU holds at once (one wave).
  const int64_t slots = resident_blocks(reinterpret_cast<const void*>(plan.kernel), plan.smem, nullptr, plan.threads);
  const int64_t most = std::max<int64_t>(1, slots / rows);
  plan.splits = static_cast<int>(std::min<int64_t>(p.splits > 0 ? p.splits : kMaxAutoSplits, most));
  // Each block's slice ids share the histogram, its decoded pages a list of kListPages.
  plan.fused = (candidates + plan.splits - 1) / plan.splits <= kSelectBins &&
               (kept + plan.splits - 1) / plan.splits <= kListPages;
  plan.candidate_stride = (candidates + 1) & ~1;
  return plan;
}

// Workspace: the split partials, then the candidates and the slice ranges (256-byte aligned parts).
struct WorkspaceParts {
  size_t partials, candidates, ranges, total;
};

WorkspaceParts workspace_parts(const QuestDecodeParams& p, const Plan& plan) {
  const auto round = [](size_t x) { return (x + 255) / 256 * 256; };
  const size_t rows = static_cast<size_t>(p.batch) * p.shape.num_kv_heads;
  WorkspaceParts w{};
  w.partials = round(split_workspace_bytes(plan.splits, static_cast<int64_t>(p.batch) * p.shape.num_q_heads,
                                           p.shape.head_dim));
  w.candidates = round(rows * plan.candidate_stride * sizeof(uint2));
  w.ranges = round(rows * plan.splits * sizeof(uint2));
  w.total = w.partials + w.candidates + w.ranges;
  return w;
}

}  // namespace

bool quest_decode_fused(const QuestDecodeParams& p) { return make_plan(p).fused; }

size_t quest_decode_workspace_bytes(const QuestDecodeParams& p) {
  const Plan plan = make_plan(p);
  return plan.fused ? workspace_parts(p, plan).total : 0;
}

size_t quest_decode_counters(const QuestDecodeParams& p) {
  return 2 * static_cast<size_t>(p.batch) * p.shape.num_kv_heads;
}

void launch_quest_decode(const QuestDecodeParams& p, void* workspace, unsigned* counters, cudaStream_t stream) {
  const Plan plan = make_plan(p);
  KV_CHECK(plan.fused, Unsupported, "the fused Quest decode does not cover this shape (quest_decode_fused)");
  if (p.batch == 0) return;
  KV_CHECK(p.batch <= 65535 && p.shape.num_kv_heads <= 65535, Unsupported,
           "the fused Quest decode supports batch and KV heads up to 65535");
  KV_CHECK(p.kv.page_size > 0 && (p.kv.page_size & (p.kv.page_size - 1)) == 0, Shape,
           "Expected a power-of-two page size but received ", p.kv.page_size);
  const auto aligned = [](const void* ptr, uintptr_t n) { return reinterpret_cast<uintptr_t>(ptr) % n == 0; };
  KV_CHECK(aligned(p.q, 16) && aligned(p.kv.k_pages, 16) && aligned(p.kv.v_pages, 16) && aligned(p.meta, 16) &&
               aligned(p.out, 8) && aligned(workspace, 256),
           Unsupported, "the Quest decode needs 16-byte-aligned q, pages, metadata and workspace, 8-byte-aligned out");
  bool has_pdl = false;
  resident_blocks(reinterpret_cast<const void*>(plan.kernel), plan.smem, &has_pdl, plan.threads);
  const WorkspaceParts parts = workspace_parts(p, plan);
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  QuestDecodeArgs a{};
  fill_decode_io(a, p);
  a.k_pages = p.kv.k_pages;
  a.v_pages = p.kv.v_pages;
  a.meta = p.meta;
  a.part_out = reinterpret_cast<float*>(ws);
  a.part_lse = a.part_out + static_cast<int64_t>(p.batch) * p.shape.num_q_heads * plan.splits * p.shape.head_dim;
  a.candidates = reinterpret_cast<uint2*>(ws + parts.partials);
  a.slice_ranges = reinterpret_cast<uint2*>(ws + parts.partials + parts.candidates);
  a.counters = counters;
  a.candidate_stride = plan.candidate_stride;
  a.budget = p.budget;
  const dim3 grid(plan.splits, p.shape.num_kv_heads, p.batch);
  launch_programmatic(plan.kernel, grid, dim3(plan.threads), plan.smem, has_pdl, stream, a);
  check_launch("quest_decode_kernel");
}

}  // namespace kvflash::cuda
