// Paged flash-decoding. A block owns one (sequence, KV head, split) and every query head of that KV
// head's GQA group, so each K/V row crosses the memory bus once per block. The group's heads are the
// rows of a 16-row tensor-core tile (m16n8k16): a decode step is two tiny matrix products per 16
// tokens, which leaves the CUDA cores free and the kernel bound by memory even at group size 8+.
//
// Data flow: the block's token range is cut into 16-token steps dealt round-robin to slices (groups
// of warps that read the same rows; one warp per slice up to group size 16). Each slice streams its
// own steps through its own cp.async ring of 16-token slots (16-byte chunks, page lookups per row),
// synchronizing only its own warps. A slice lifts a step's K and V fragments into registers
// (ldmatrix) and refills the slot at once, before the math, so no slot waits on the tensor cores or
// the online softmax (float32) and no warp waits on another. Warps merge in shared memory at the
// end. When the grid would not fill the GPU, the sequence is split across blocks (split-K) and a
// second kernel merges the partial (out, lse) pairs by their log-sum-exp.
#include "decode.h"
#include "decode_common.cuh"

namespace kvflash::cuda {
namespace {

constexpr int kTile = 64;  // tokens: splits cover whole tiles, so only a sequence's last step is partial
constexpr int kStep = 16;  // tokens per ring slot and per mma step

struct DecodeArgs : DecodeIO {
  const void* k_pages;
  const void* v_pages;
  int rows_per_sequence;  // 1, or Hkv when each KV head has its own table row (Quest)
  int head_chunks, num_splits;
};

// ---- the decode kernel -----------------------------------------------------------------------

// Orders the threads of one slice: a warp's own, or a named barrier over the slice's warps.
// compute-sanitizer racecheck reports hazards across the block-wide barriers of finish_block when
// slices run different numbers of named-barrier steps (groups 17-32: two slices, a step apart). A
// minimal probe with that pattern alone (two 64-thread slices, bar.sync 1 + slice, 7 and 6 steps,
// then __syncthreads around a shared store and load) draws 1858 such reports; with 5 and 5 steps,
// or __syncthreads throughout, none. So they are the tool's, not the kernel's (H100, CUDA 13).
template <int THREADS>
__device__ __forceinline__ void slice_sync(int slice) {
  if constexpr (THREADS == 32) {
    __syncwarp();
  } else {
    asm volatile("bar.sync %0, %1;\n" ::"r"(1 + slice), "n"(THREADS) : "memory");
  }
}

// T: element type of q, pages and out.
// D: head dimension.
// MTILES: 16-head tiles per block (group sizes up to 16 * MTILES); the MTILES warps of a slice share
//   its rows, one head tile each.
// SLOTS: depth of each slice's ring, in 16-token slots.
template <typename T, int D, int MTILES, int SLOTS>
__global__ void __launch_bounds__(kThreads) paged_decode_kernel(const DecodeArgs a) {
  constexpr int SLICES = kWarps / MTILES;
  constexpr int SLICE_THREADS = 32 * MTILES;
  constexpr int CPR = D / 8;                       // 16-byte chunks per row
  constexpr int ROW_STEP = SLICE_THREADS / CPR;    // rows a slice copies per pass
  constexpr int RPT = kStep / ROW_STEP;            // rows each thread copies per step
  constexpr int HEADS = 16 * MTILES;
  constexpr int NT = D / 8;                        // 8-wide column tiles of the output
  constexpr int SLOT = 2 * kStep * D;              // elements of a slot: K rows, then V rows
  // V fragments held in registers let the slot go before the math; at D = 256 they would not fit
  // beside the accumulators, so there the slot is refilled after the step.
  constexpr bool kEarlyRefill = D <= 128;
  static_assert(ROW_STEP >= 1 && kStep % ROW_STEP == 0, "a slice copies whole rows");

  extern __shared__ __align__(128) unsigned char smem[];
  T* ring = reinterpret_cast<T*>(smem);            // [SLICES][SLOTS][K, V][kStep][D]
  T* q_s = ring + SLICES * SLOTS * SLOT;           // [HEADS][D]

  const int hk = blockIdx.x / a.head_chunks;
  const int head_chunk = blockIdx.x % a.head_chunks;
  const int split = blockIdx.y;
  const int b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int mtile = warp % MTILES;
  const int slice = warp / MTILES;

  // Launched early (programmatic): nothing above reads memory.
  wait_for_previous_grid();
  // Lets the merge grid launch now and wait on-device (it still sees all of this grid's writes).
  launch_dependents();
  const int table_row = a.rows_per_sequence == 1 ? b : b * a.rows_per_sequence + hk;
  const int page_begin = a.indptr[table_row];
  const int npages = a.indptr[table_row + 1] - page_begin;
  const int page_size = 1 << a.log2_page;
  const int len = npages > 0 ? (npages - 1) * page_size + a.last_page_len[table_row] : 0;
  const int per_split = ((len + a.num_splits - 1) / a.num_splits + kTile - 1) / kTile * kTile;
  const int start = split * per_split;
  const int end = min(len, start + per_split);
  // Steps of the block's range, dealt round-robin to the slices.
  const int nsteps = start < end ? (end - start + kStep - 1) / kStep : 0;
  const int my_steps = nsteps > slice ? (nsteps - slice + SLICES - 1) / SLICES : 0;

  const int head0 = head_chunk * HEADS;
  const int nheads = min(HEADS, a.group - head0);
  const int qh0 = hk * a.group + head0;

  // The block's query rows, as their own copy group (padding rows are zeros).
  const T* q_rows = static_cast<const T*>(a.q) + (static_cast<int64_t>(b) * a.num_heads + qh0) * D;
  for (int i = tid; i < HEADS * CPR; i += kThreads) {
    const int r = i / CPR, c = i % CPR;
    cp_async16(smem_addr(q_s + swz<D>(r, c)), q_rows + (r < nheads ? r * D + c * 8 : 0), r < nheads);
  }
  cp_async_commit();

  // Each thread copies chunk `cc` of rows r0, r0 + ROW_STEP, ... of its slice's steps; page ids are
  // loaded one step early so a copy never waits on the page-table read.
  const int st = tid % SLICE_THREADS;
  const int cc = st % CPR, r0 = st / CPR;
  const int64_t page_stride = static_cast<int64_t>(page_size) * a.num_kv_heads * D;
  const int64_t row_stride = static_cast<int64_t>(a.num_kv_heads) * D;
  const T* kp = static_cast<const T*>(a.k_pages) + hk * D + cc * 8;
  const T* vp = static_cast<const T*>(a.v_pages) + hk * D + cc * 8;
  const int32_t* seq_pages = a.indices + page_begin;
  T* my_ring = ring + slice * SLOTS * SLOT;
  int pg[RPT];

  const auto step_start = [&](int j) { return start + (slice + j * SLICES) * kStep; };
  auto load_pages = [&](int j) {
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      const int pos = step_start(j) + r0 + i * ROW_STEP;
      pg[i] = pos < end ? __ldg(seq_pages + (pos >> a.log2_page)) : 0;
    }
  };
  // Copies step j into its slot (nothing past the slice's last step) and closes its copy group.
  auto issue = [&](int j) {
    if (j < my_steps) {
      T* ks = my_ring + (j % SLOTS) * SLOT;
      T* vs = ks + kStep * D;
#pragma unroll
      for (int i = 0; i < RPT; ++i) {
        const int r = r0 + i * ROW_STEP;
        const int pos = step_start(j) + r;
        const bool valid = pos < end;
        const int64_t off = valid ? pg[i] * page_stride + (pos & (page_size - 1)) * row_stride : 0;
        const int so = swz<D>(r, cc);
        cp_async16(smem_addr(ks + so), kp + off, valid);
        cp_async16(smem_addr(vs + so), vp + off, valid);
      }
    }
    load_pages(j + 1);
    cp_async_commit();
  };

  float o[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY};  // running max of rows lane/4 and lane/4 + 8 (log2 domain)
  float l[2] = {0.f, 0.f};              // this lane's share of the running denominators
  const uint32_t q_base = smem_addr(q_s);

  load_pages(0);
#pragma unroll
  for (int s = 0; s < SLOTS; ++s) issue(s);
  cp_async_wait<SLOTS>();  // the query rows (the steps may still be in flight)
  __syncthreads();

  for (int j = 0; j < my_steps; ++j) {
    cp_async_wait<SLOTS - 1>();
    slice_sync<SLICE_THREADS>(slice);  // step j landed for the whole slice
    const T* ks = my_ring + (j % SLOTS) * SLOT;
    const uint32_t k_base = smem_addr(ks);
    const uint32_t v_base = smem_addr(ks + kStep * D);
    const int pos0 = step_start(j);

    uint32_t kf[D / 16][4], vf[kEarlyRefill ? D / 16 : 1][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      ldsm_x4(kf[kk], k_base + 2 * swz<D>((lane & 7) + (lane >> 4) * 8, kk * 2 + ((lane >> 3) & 1)));
    if constexpr (kEarlyRefill) {
#pragma unroll
      for (int jj = 0; jj < D / 16; ++jj)
        ldsm_x4_trans(vf[jj], v_base + 2 * swz<D>((lane & 7) + ((lane >> 3) & 1) * 8, jj * 2 + (lane >> 4)));
      slice_sync<SLICE_THREADS>(slice);  // the slot is read: refill it while the math runs
      issue(j + SLOTS);
    }

    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qa[4];
      ldsm_x4(qa, q_base + 2 * swz<D>(mtile * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, kk * 2 + (lane >> 4)));
      Elem<T>::mma(s[0], qa, kf[kk][0], kf[kk][1]);
      Elem<T>::mma(s[1], qa, kf[kk][2], kf[kk][3]);
    }

    uint32_t pa[4];
    softmax_step<T, NT>(s, pos0, end, a.scale_log2, m, l, o, pa);
#pragma unroll
    for (int jj = 0; jj < D / 16; ++jj) {
      uint32_t vb[4];
      if constexpr (kEarlyRefill) {
#pragma unroll
        for (int e = 0; e < 4; ++e) vb[e] = vf[jj][e];
      } else {
        ldsm_x4_trans(vb, v_base + 2 * swz<D>((lane & 7) + ((lane >> 3) & 1) * 8, jj * 2 + (lane >> 4)));
      }
      Elem<T>::mma(o[2 * jj], pa, vb[0], vb[1]);
      Elem<T>::mma(o[2 * jj + 1], pa, vb[2], vb[3]);
    }
    if constexpr (!kEarlyRefill) {
      slice_sync<SLICE_THREADS>(slice);
      issue(j + SLOTS);
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
  // 64 KB of ring per block up to D = 128 (two blocks fit an SM), 128 KB at D = 256 (one). Deeper
  // rings measured slower on the H100 (64x4096 at D = 128: 359.9 us; 96 KB 362.7, 128 KB 365.4,
  // 160 KB 366.6). Each slice gets an equal share of the slots.
  constexpr int slot_bytes = 2 * kStep * D * sizeof(T);
  constexpr int slices = kWarps / MTILES;
  constexpr int slots = (D == 256 ? 128 * 1024 : 64 * 1024) / slot_bytes / slices;
  constexpr size_t ring = static_cast<size_t>(slices) * slots * slot_bytes;
  const size_t q = static_cast<size_t>(16 * MTILES) * D * sizeof(T);
  static_assert(slots >= 2, "a slice needs one slot in flight beside the one it reads");
  static_assert(ring >= (kWarps * 16 * D + 2 * kWarps * 16) * 4, "the warp merge reuses the ring");
  return {paged_decode_kernel<T, D, MTILES, slots>, launch_merge<T>, 16 * MTILES, ring + q};
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

// Splits from host-known capacities (plan_splits in decode_common.cuh), for one block per SM: where
// a sequence has to be split, one block per SM beat two on the H100 (16x8192: 128 blocks and no merge
// 183 us, 256 blocks 188 us; 1x32768: 16 splits 55.2 us, 32 splits 56.4 us).
Plan make_plan(const DecodeParams& p) {
  Plan plan{choose_kernel(p), 0, 1};
  const int group = p.shape.num_q_heads / p.shape.num_kv_heads;
  plan.head_chunks = (group + plan.k.heads_per_block - 1) / plan.k.heads_per_block;
  const int64_t max_len = static_cast<int64_t>(p.max_pages_per_seq) * p.kv.page_size;
  const int64_t base = static_cast<int64_t>(p.batch) * p.shape.num_kv_heads * plan.head_chunks;
  int sms = 0;  // only read when the count is not forced
  if (p.splits <= 0) {
    int device = 0;
    KV_CUDA(cudaGetDevice(&device));
    KV_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  }
  plan.splits = plan_splits(base, sms, max_len, kTile, p.splits);
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
  fill_decode_io(a, p);
  a.k_pages = p.kv.k_pages;
  a.v_pages = p.kv.v_pages;
  a.rows_per_sequence = p.kv.rows_per_sequence;
  a.head_chunks = plan.head_chunks;
  a.num_splits = plan.splits;
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
