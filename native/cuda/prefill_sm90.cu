// Hopper (sm_90a) prefill for head dim 128, after FlashAttention-3: the same function as the
// mma.sync kernel in prefill.cu (ragged q/k/v, causal aligned to the end of each key sequence,
// window, scale, lse, GQA), on the warpgroup tensor-core path.
//
// Work item: BM = 128 queries of one (sequence, head). Items are numbered heaviest first (last
// query tiles first) and a persistent grid of one block per SM takes them in turn, so the copies
// for the next item overlap the tail of the current one. A block runs three warpgroups:
//   producer   one thread issues TMA copies: each item's Q into one of two Q buffers, then its K and
//              V tiles of BN = 128 keys into a ring of STAGES buffers, waiting on an "empty"
//              mbarrier per buffer before reuse and completing a "full" one. It keeps 24 registers
//              (setmaxnreg) so that
//   consumers  (two warpgroups, 64 query rows each) can hold 240: the O accumulator (64 f32), S of
//              the tile in flight (64 f32) and P of the previous tile (32 x bf16x2) at once.
// Per K/V tile a consumer issues S = Q K^T as wgmma with both operands in shared memory (K-major),
// runs the online softmax on S in registers, and issues O += P V with P straight from registers (the
// f32 S fragment of 16 key columns is the bf16 A fragment of one k-step) and V read MN-major.
//
// Overlap:
//   issue order  S of tile t is issued right before P V of tile t + 1 (O's rescale for tile t + 1
//                between the two), so the tensor cores run both back to back.
//   ping-pong    the two consumers take turns to issue (a pair of named barriers), so one's
//                softmax runs while the other's matrix products occupy the tensor cores.
// FA3 also overlaps a warpgroup's softmax of S(t) with its own P V(t + 1). Here the compiler hoists
// the P V wait above the softmax (seen in SASS), and the variants that force the overlap (P
// double-buffered, or the wait moved past a barrier) measured 3-7% slower on an H100 at S <= 4096,
// so this kernel waits for both products before the softmax.
//
// Tiles are visited last to first, as in prefill.cu: the masked ones (causal diagonal, ragged end)
// come first. The first of them may run past its sequence into the next one (TMA boxes are
// fixed-size; only the tensor's end reads as zeros): those keys are masked to -inf (by selection,
// so a NaN key changes nothing), and the consumers zero those V rows before P V reads them, since
// 0 times a neighbour's inf or NaN would still be NaN: one sequence's values never reach another's
// output. Rows of Q past the sequence compute values that are never stored.
#include <cuda.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <cstdint>

#include "hopper.cuh"
#include "prefill_sm90.h"

namespace kvflash::cuda {
namespace {

constexpr int kD = 128;   // head dim
constexpr int kBM = 128;  // queries per item: 64 per consumer warpgroup
constexpr int kBN = 128;  // keys per K/V tile
constexpr int kThreads = 384;
constexpr uint32_t kQBytes = kBM * kD * 2;
constexpr uint32_t kTileBytes = kBN * kD * 2;
static_assert(kBM == 128 && kBN == 128, "Q, K and V share the 128-row TMA box");

template <int STAGES>
constexpr int smem_bytes() {
  // 1024 bytes of alignment slack, two Q buffers, the K and V rings, then the barriers and the two
  // item slots.
  return 1024 + 2 * kQBytes + 2 * STAGES * kTileBytes + 8 * (4 + 4 * STAGES) + 8;
}

// Items after each block's first come from this counter, zeroed by the launcher before each launch
// (launches on one device are ordered on its stream). Handing them out on demand keeps the blocks
// balanced when items differ in cost (causal rows, ragged lengths); a fixed stride over the grid
// measured 1-3% slower on an H100 (at S = 16384 block 0 then gets ~3% more tiles than the average).
__device__ unsigned int g_next_item;

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
constexpr uint32_t kBlock64 = 128 * 128;  // bytes of one 64-column block of a 128-row tile (Q, K or V)

// One work item, and the K/V tiles its queries see.
struct Item {
  int h, q0, q_start, sq, k_start, sk;
  int pos_lo;   // position (in key coordinates) of the item's first query
  int t_end;    // last tile; tiles t_end, t_end - 1, ... are visited
  int n_tiles;  // 0 when no query of the item sees a key
  __device__ Item(const PrefillParams& p, int q_tiles, int index) {
    const int heads = p.shape.num_q_heads;
    h = index % heads;
    const int b = (index / heads) % p.batch;
    q0 = (q_tiles - 1 - index / (heads * p.batch)) * kBM;
    q_start = p.cu_seqlens_q[b];
    sq = p.cu_seqlens_q[b + 1] - q_start;
    k_start = p.cu_seqlens_k[b];
    sk = p.cu_seqlens_k[b + 1] - k_start;
    pos_lo = sk - sq + q0;
    const int pos_hi = sk - sq + min(q0 + kBM, sq) - 1;
    const int key_hi = p.mask.causal ? min(sk - 1, pos_hi) : sk - 1;
    const int key_lo = p.mask.window_left >= 0 ? max(0, pos_lo - p.mask.window_left) : 0;
    n_tiles = key_hi >= key_lo && q0 < sq ? key_hi / kBN - key_lo / kBN + 1 : 0;
    t_end = key_hi / kBN;
  }
};
#endif

// Template parameters:
//   T       element type of q, k, v, out (__nv_bfloat16 or __half)
//   STAGES  K/V buffers in the ring (each holds one K and one V tile, 64 KB)
template <typename T, int STAGES>
__global__ void __launch_bounds__(kThreads, 1)
    prefill_sm90_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                        const __grid_constant__ CUtensorMap tm_v, const PrefillParams p, int q_tiles) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace sm90;
  extern __shared__ unsigned char smem[];
  // 128-byte swizzled tiles need 1024-byte alignment; smem_bytes() has the slack.
  const uint32_t sQ = (smem_addr(smem) + 1023) & ~1023u;  // Q buffer qb at sQ + qb * kQBytes
  const uint32_t sK = sQ + 2 * kQBytes;                   // K buffer s at sK + s * kTileBytes
  const uint32_t sV = sK + STAGES * kTileBytes;           // V buffer s likewise
  const uint32_t bars = sV + STAGES * kTileBytes;
  auto q_full = [&](int qb) { return bars + 8 * qb; };
  auto q_empty = [&](int qb) { return bars + 8 * (2 + qb); };
  auto k_full = [&](int s) { return bars + 8 * (4 + s); };
  auto k_empty = [&](int s) { return bars + 8 * (4 + STAGES + s); };
  auto v_full = [&](int s) { return bars + 8 * (4 + 2 * STAGES + s); };
  auto v_empty = [&](int s) { return bars + 8 * (4 + 3 * STAGES + s); };
  // The item index each Q buffer holds, or -1: no more items. The producer writes it only after
  // q_empty shows both consumers done with the buffer, and publishes it with its q_full arrival.
  // (compute-sanitizer racecheck reports this hand-off: it does not model mbarrier ordering.)
  volatile int* item_slot = reinterpret_cast<volatile int*>(smem + (bars + 8 * (4 + 4 * STAGES) - smem_addr(smem)));
  const int num_items = q_tiles * p.batch * p.shape.num_q_heads;

  const int tid = threadIdx.x;
  if (tid == 0) {
    for (int qb = 0; qb < 2; ++qb) {
      mbar_init(q_full(qb), 1);
      mbar_init(q_empty(qb), 8);  // one arrival per consumer warp
    }
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(k_full(s), 1);
      mbar_init(v_full(s), 1);
      mbar_init(k_empty(s), 8);
      mbar_init(v_empty(s), 8);
    }
    mbar_init_fence();
  }
  __syncthreads();

  if (tid < 128) {
    regs_shrink<24>();
    if (tid != 0) return;
    auto fetch = [] { return static_cast<int>(gridDim.x + atomicAdd(&g_next_item, 1u)); };
    const int group = p.shape.num_q_heads / p.shape.num_kv_heads;
    int item = blockIdx.x;
    int next = fetch();  // in flight while this item's copies are issued
    for (int j = 0, tile = 0;; item = next, next = fetch()) {
      const bool done = item >= num_items;
      const Item w(p, q_tiles, done ? 0 : item);
      if (!done && w.q0 >= w.sq) continue;  // a tile past a short sequence's queries
      const int qb = j & 1;
      mbar_wait(q_empty(qb), ((j >> 1) & 1) ^ 1);
      item_slot[qb] = done ? -1 : item;
      if (done || w.n_tiles == 0) {
        mbar_arrive(q_full(qb));
        if (done) return;
      } else {
        mbar_arrive_expect_tx(q_full(qb), kQBytes);
        tma_load_3d(sQ + qb * kQBytes, &tm_q, 0, w.h, w.q_start + w.q0, q_full(qb));
        tma_load_3d(sQ + qb * kQBytes + kBlock64, &tm_q, 64, w.h, w.q_start + w.q0, q_full(qb));
      }
      const int kv_head = w.h / group;
      // One K or V tile into its ring buffer: wait until both consumers released the buffer,
      // announce its bytes, copy both 64-column halves.
      auto load = [&](const CUtensorMap* map, uint32_t buf, uint32_t full, uint32_t empty, uint32_t phase, int row) {
        mbar_wait(empty, phase ^ 1);  // a fresh barrier passes parity 1 at once
        mbar_arrive_expect_tx(full, kTileBytes);
        tma_load_3d(buf, map, 0, kv_head, row, full);
        tma_load_3d(buf + kBlock64, map, 64, kv_head, row, full);
      };
      for (int i = 0; i < w.n_tiles; ++i, ++tile) {
        const int s = tile % STAGES;
        const uint32_t phase = (tile / STAGES) & 1;
        const int row = w.k_start + (w.t_end - i) * kBN;
        load(&tm_k, sK + s * kTileBytes, k_full(s), k_empty(s), phase, row);
        load(&tm_v, sV + s * kTileBytes, v_full(s), v_empty(s), phase, row);
      }
      ++j;
    }
  }
  regs_grow<240>();

  using Mma = Wgmma<T>;
  const int c = tid / 128 - 1;  // consumer 0 or 1
  const int warp = (tid / 32) & 3;
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int tq = lane & 3;
  const int row0 = 64 * c + 16 * warp + g;  // this thread's rows in the item: row0 and row0 + 8
  const bool causal = p.mask.causal;
  const int window = p.mask.window_left;
  const int num_heads = p.shape.num_q_heads;
  // scale > 0 (the binding checks): the max of raw logits scales to the max of scaled ones, so
  // the scale folds into the FFMA before each exp2.
  const float scale_log2 = p.mask.scale * kLog2e;
  const uint64_t desc_k = smem_desc(sK, 16, 1024);
  const uint64_t desc_v = smem_desc(sV, kBlock64, 1024);

  // Ping-pong turns: consumer c waits on named barrier 1 + c, then hands the turn to the other.
  // Both consumers run the same sequence of issue sections (n_tiles + 1 per item), so the turns
  // alternate strictly across items too. Consumer 0 opens the first turn and, at the end, takes
  // the turn that consumer 1's last section handed on, so both barriers end balanced.
  auto turn_wait = [&] { named_sync(1 + c, 256); };
  auto turn_pass = [&] { named_arrive(2 - c, 256); };
  if (c == 0) named_arrive(1, 256);

  float o[64];
  float s[64];
  uint32_t pf[32];
#pragma unroll
  for (int i = 0; i < 64; ++i) s[i] = 0.f;

  for (int j = 0, tile = 0;; ++j) {
    const int qb = j & 1;
    mbar_wait(q_full(qb), (j >> 1) & 1);
    const int item = item_slot[qb];
    if (item < 0) {
      if (c == 0) turn_wait();
      return;
    }
    const Item w(p, q_tiles, item);
    const int wg_lo = w.pos_lo + 64 * c;  // positions of the consumer's first and last rows
    const int wg_hi = wg_lo + 63;
    const uint32_t q_tile = sQ + qb * kQBytes;

#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.f;
    float m[2] = {-INFINITY, -INFINITY};  // running max of the log2-scaled logits of the two rows
    float l[2] = {0.f, 0.f};              // this thread's share of the running denominators
    float corr[2] = {1.f, 1.f};           // factor O still owes the last softmax's max change

    if (w.n_tiles > 0) {
      const uint64_t desc_q = smem_desc(q_tile + c * 64 * 128, 16, 1024);
      // S = Q K^T over D in 8 k-steps of 16: 32 bytes along a swizzled row, a new 64-column block
      // every 4 steps.
      auto issue_qk = [&](int buf) {
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kD / 16; ++kk) {
          const uint32_t off = (kk / 4) * kBlock64 + (kk % 4) * 32;
          Mma::ss(s, desc_q + (off >> 4), desc_k + ((buf * kTileBytes + off) >> 4), kk > 0);
        }
        wgmma_commit();
      };
      // O += P V over the tile's keys in 8 k-steps of 16 keys (16 rows of 128 bytes of V).
      auto issue_pv = [&](int buf) {
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk)
          Mma::rs(o, pf[4 * kk], pf[4 * kk + 1], pf[4 * kk + 2], pf[4 * kk + 3],
                  desc_v + ((buf * kTileBytes + kk * 16 * 128) >> 4));
        wgmma_commit();
      };
      // Masks S of tile t where needed, then the online softmax: S becomes P (f32), m and l move
      // on, corr is what O owes.
      auto softmax = [&](int t) {
        const int n0 = t * kBN;
        const bool need_mask =
            n0 + kBN > w.sk || (causal && n0 + kBN - 1 > wg_lo) || (window >= 0 && n0 < wg_hi - window);
        if (need_mask) {
          // Column 8j + 2tq + e is key n0 + 8j + 2tq + e, visible from position pos iff
          // lo <= 8j + e <= hi with the thread's 2tq folded into the bounds.
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int pos = w.pos_lo + row0 + 8 * r;
            int hi = w.sk - 1 - n0;
            if (causal) hi = min(hi, pos - n0);
            hi -= 2 * tq;
            const int lo = (window >= 0 ? pos - window - n0 : 0) - 2 * tq;
#pragma unroll
            for (int jj = 0; jj < 16; ++jj)
#pragma unroll
              for (int e = 0; e < 2; ++e)
                if (8 * jj + e > hi || 8 * jj + e < lo) s[4 * jj + 2 * r + e] = -INFINITY;
          }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float mx = -INFINITY;
#pragma unroll
          for (int jj = 0; jj < 16; ++jj) mx = fmaxf(mx, fmaxf(s[4 * jj + 2 * r], s[4 * jj + 2 * r + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          mx = fmaxf(m[r], mx * scale_log2);
          // A row with no visible key yet keeps max -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
          const float base = mx == -INFINITY ? 0.f : mx;
          corr[r] = exp2_ftz(m[r] - base);
          m[r] = mx;
          float sum = 0.f;
#pragma unroll
          for (int jj = 0; jj < 16; ++jj)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float x = exp2_ftz(fmaf(s[4 * jj + 2 * r + e], scale_log2, -base));
              s[4 * jj + 2 * r + e] = x;
              sum += x;
            }
          l[r] = l[r] * corr[r] + sum;
        }
      };
      // Once the running max settles, most tiles leave it unchanged for every row of a warp: skip
      // the 64 multiplies then (the vote keeps the branch warp-uniform).
      auto rescale = [&] {
        if (__any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f)) {
#pragma unroll
          for (int jj = 0; jj < 16; ++jj) {
            o[4 * jj] *= corr[0];
            o[4 * jj + 1] *= corr[0];
            o[4 * jj + 2] *= corr[1];
            o[4 * jj + 3] *= corr[1];
          }
        }
      };
      // P as A fragments: registers 8kk .. 8kk + 7 of S are k-step kk's (row, column) pairs in order.
      auto pack = [&] {
#pragma unroll
        for (int i = 0; i < 32; ++i) pf[i] = Elem<T>::pack(s[2 * i], s[2 * i + 1]);
      };
      auto release = [&](uint32_t bar) {
        if (lane == 0) mbar_arrive(bar);
      };
      turn_wait();
      mbar_wait(k_full(tile % STAGES), (tile / STAGES) & 1);
      issue_qk(tile % STAGES);
      turn_pass();
      wgmma_wait<0>();
      hold(s);
      release(k_empty(tile % STAGES));
      softmax(w.t_end);
      pack();
      const int valid_rows = w.sk - w.t_end * kBN;
      if (valid_rows < kBN) {
        // The consumers split the V rows past the sequence, zero them, and meet (named barrier 3)
        // before either issues a P V that reads the buffer.
        const uint32_t buf = sV + (tile % STAGES) * kTileBytes;
        mbar_wait(v_full(tile % STAGES), (tile / STAGES) & 1);
        const int chunks = (kBN - valid_rows) * 16;  // 16-byte chunks: 8 per 64-column block of a row
        for (int i = tid - 128; i < chunks; i += 256) {
          const int row = valid_rows + i / 16;
          const uint32_t at = buf + ((i / 8) & 1) * kBlock64 + row * 128 + (i % 8) * 16;
          asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(at), "r"(0u) : "memory");
        }
        fence_proxy_async();
        named_sync(3, 256);
      }
      for (int i = 1; i < w.n_tiles; ++i) {
        const int cur = tile + i, prev = tile + i - 1;
        turn_wait();
        mbar_wait(k_full(cur % STAGES), (cur / STAGES) & 1);
        issue_qk(cur % STAGES);
        rescale();
        mbar_wait(v_full(prev % STAGES), (prev / STAGES) & 1);
        issue_pv(prev % STAGES);
        turn_pass();
        wgmma_wait<1>();  // S(t) is in
        hold(s);
        release(k_empty(cur % STAGES));
        softmax(w.t_end - i);
        wgmma_wait<0>();
        hold(o);
        hold(pf);
        release(v_empty(prev % STAGES));
        pack();
      }
      const int last = tile + w.n_tiles - 1;
      turn_wait();
      rescale();
      mbar_wait(v_full(last % STAGES), (last / STAGES) & 1);
      issue_pv(last % STAGES);
      turn_pass();
      wgmma_wait<0>();
      hold(o);
      hold(pf);
      release(v_empty(last % STAGES));
      tile += w.n_tiles;
    }

    // Epilogue: finish the denominators, normalise, and stage the rows through this consumer's
    // own rows of the Q buffer (its last S is done, and only it reads them) so that each warp
    // writes its 16 rows with 16-byte stores.
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
      l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
      inv[r] = l[r] > 0.f ? 1.f / l[r] : 0.f;
      const int i = w.q0 + row0 + 8 * r;
      if (p.lse != nullptr && tq == 0 && i < w.sq) {
        p.lse[static_cast<int64_t>(w.q_start + i) * num_heads + w.h] =
            l[r] > 0.f ? (m[r] + log2f(l[r])) * kLn2 : -INFINITY;
      }
    }
    unsigned char* staged = smem + (q_tile - smem_addr(smem));
#pragma unroll
    for (int jj = 0; jj < 16; ++jj)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = row0 + 8 * r;  // row & 7 == g
        const uint32_t at = (jj / 8) * kBlock64 + row * 128 + (((jj % 8) ^ g) << 4) + tq * 4;
        *reinterpret_cast<uint32_t*>(staged + at) =
            Elem<T>::pack(o[4 * jj + 2 * r] * inv[r], o[4 * jj + 2 * r + 1] * inv[r]);
      }
    __syncwarp();
    T* out = static_cast<T*>(p.out);
    const int64_t row_stride = static_cast<int64_t>(num_heads) * kD;
#pragma unroll
    for (int it = 0; it < 8; ++it) {
      const int i = lane + 32 * it;
      const int row = 64 * c + 16 * warp + i / 16;
      const int chunk = i % 16;  // 16-byte chunk of the 256-byte row
      if (w.q0 + row < w.sq) {
        const uint32_t at = (chunk / 8) * kBlock64 + row * 128 + (((chunk % 8) ^ (row & 7)) << 4);
        *reinterpret_cast<uint4*>(out + (w.q_start + w.q0 + row) * row_stride + w.h * kD + chunk * 8) =
            *reinterpret_cast<const uint4*>(staged + at);
      }
    }
    // The buffer goes back to the producer, whose next TMA write (async proxy) must follow these
    // ordinary accesses.
    fence_proxy_async();
    __syncwarp();
    if (lane == 0) mbar_arrive(q_empty(qb));
  }
#else
  __trap();  // launched only where prefill_sm90_fits holds, which needs the sm_90a build
#endif
}

// ---------------------------------------------------------------------------------------------
// Host side

using EncodeTiled = PFN_cuTensorMapEncodeTiled_v12000;

// The runtime links statically, so the driver's tensor-map encoder comes through the runtime's
// entry-point query rather than -lcuda.
EncodeTiled encode_tiled() {
  static const EncodeTiled fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    check(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found),
          "cudaGetDriverEntryPointByVersion(cuTensorMapEncodeTiled)");
    if (found != cudaDriverEntryPointSuccess || f == nullptr) {
      fail(ErrorCode::Cuda, "the CUDA driver offers no cuTensorMapEncodeTiled");
    }
    return reinterpret_cast<EncodeTiled>(f);
  }();
  return fn;
}

// [rows, heads, 128] row-major, read in boxes of 128 rows x 64 columns of one head, 128-byte swizzle.
CUtensorMap rows_map(const void* base, DType dtype, int heads, int rows) {
  CUtensorMap map;
  const cuuint64_t dims[3] = {kD, static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[2] = {kD * 2, static_cast<cuuint64_t>(heads) * kD * 2};  // bytes, dims 1 and 2
  const cuuint32_t box[3] = {64, 1, 128};
  const cuuint32_t step[3] = {1, 1, 1};
  const CUresult r = encode_tiled()(&map, dtype == DType::BF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                                    3, const_cast<void*>(base), dims, strides, box, step, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                    CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                    CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) fail(ErrorCode::Cuda, "cuTensorMapEncodeTiled failed with CUresult ", static_cast<int>(r));
  return map;
}

template <typename T>
void launch(const PrefillParams& p, cudaStream_t stream) {
  constexpr int kStages = 2;  // a third buffer measured no faster (and does not fit beside two Q buffers)
  auto kernel = prefill_sm90_kernel<T, kStages>;
  constexpr int smem = smem_bytes<kStages>();
  int max_q = 0;
  for (int b = 0; b < p.batch; ++b) max_q = std::max(max_q, p.cu_seqlens_q_host[b + 1] - p.cu_seqlens_q_host[b]);
  if (max_q <= 0) return;
  const int q_tiles = (max_q + kBM - 1) / kBM;
  const int items = q_tiles * p.batch * p.shape.num_q_heads;
  int device = 0, sms = 0;
  KV_CUDA(cudaGetDevice(&device));
  KV_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  KV_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  void* counter = nullptr;
  KV_CUDA(cudaGetSymbolAddress(&counter, g_next_item));
  KV_CUDA(cudaMemsetAsync(counter, 0, sizeof(unsigned int), stream));
  const CUtensorMap tm_q = rows_map(p.q, p.dtype, p.shape.num_q_heads, p.total_q);
  const CUtensorMap tm_k = rows_map(p.k, p.dtype, p.shape.num_kv_heads, p.total_k);
  const CUtensorMap tm_v = rows_map(p.v, p.dtype, p.shape.num_kv_heads, p.total_k);
  kernel<<<std::min(items, sms), kThreads, smem, stream>>>(tm_q, tm_k, tm_v, p, q_tiles);
  check_launch("prefill_sm90_kernel");
}

}  // namespace

bool prefill_sm90_fits(const PrefillParams& p) {
#if defined(KVFLASH_SM90A)
  if (p.shape.head_dim != kD || (p.dtype != DType::BF16 && p.dtype != DType::F16)) return false;
  if (p.total_q <= 0 || p.total_k <= 0 || p.cu_seqlens_q_host == nullptr) return false;
  auto aligned = [](const void* x) { return reinterpret_cast<uintptr_t>(x) % 16 == 0; };
  if (!aligned(p.q) || !aligned(p.k) || !aligned(p.v) || !aligned(p.out)) return false;
  int device = 0, major = 0, minor = 0;
  KV_CUDA(cudaGetDevice(&device));
  KV_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  KV_CUDA(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return major == 9 && minor == 0;
#else
  (void)p;
  return false;
#endif
}

void launch_prefill_sm90(const PrefillParams& p, cudaStream_t stream) {
  if (p.dtype == DType::BF16) {
    launch<__nv_bfloat16>(p, stream);
  } else {
    launch<__half>(p, stream);
  }
}

}  // namespace kvflash::cuda
