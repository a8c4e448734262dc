// Quest's top-k as a threshold: of a row's candidates (order keys, quest_bounds.cuh), the k largest
// are those whose key is above a threshold key, plus the first few equal to it in candidate order
// (so earlier pages win ties, as the host's stable sort decides). The pieces here are shared by the
// top-k kernel (quest.cu) and the fused Quest decode (quest_decode.cu), whose block keeps a row's
// (key, page id) pairs in shared memory and finds the threshold in a few barrier-separated steps:
// one 12-bit radix pass from the highest bit where the row's keys differ usually leaves a final bin
// of a handful of keys, which one warp ranks exactly, or of copies of one key (duplicate pages),
// which is then the threshold as it is (measured, pages repeating every 256: 32K tokens 24.3 -> 23.2
// us, 128K 38.7 -> 38.0, at a 2048-token budget). Loops stay compact: the fused kernel runs each
// phase once per block, cold, so code fetched once costs as much as the work (measured: per-key
// loops unrolled 64 times took ~300 cycles a key, and every block waited on the same fetches). The
// short loops that remain unrolled stay so: rolling them (the bin walk, the member ranking, the key
// passes) cost 0.5-0.8 us at 32K tokens and 1.3-1.7 us at 128K, and the kernel ran no faster with its
// code already in L2, so what is left is each step's chain of dependent instructions.
#pragma once
#include <cstdint>

namespace kvflash::cuda {
namespace {

// A digit bin holding at most this many keys is finished by one warp ranking them, not by more passes.
constexpr int kRankWarp = 32;
// Bins of one radix pass of select_threshold (12-bit digits).
constexpr int kSelectBins = 4096;

// Where the selection stands: candidates whose masked key is above `prefix` are taken, and of those
// equal to it the first `remaining` in candidate order. `count` is how many candidates are equal to it.
struct Threshold {
  uint32_t prefix, mask;
  int remaining, count;
};

// The exclusive prefix sums over a block of WARPS warps of each thread's (x, y), through `warp_totals`.
template <int WARPS>
__device__ __forceinline__ int2 block_exclusive_sum(int2 v, int2* warp_totals) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int2 inclusive = v;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const int ux = __shfl_up_sync(0xffffffffu, inclusive.x, offset);
    const int uy = __shfl_up_sync(0xffffffffu, inclusive.y, offset);
    if (lane >= offset) inclusive.x += ux, inclusive.y += uy;
  }
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  int2 before = make_int2(inclusive.x - v.x, inclusive.y - v.y);
#pragma unroll
  for (int w = 0; w < WARPS; ++w) {
    const int2 total = warp_totals[w];
    if (w < warp) before.x += total.x, before.y += total.y;
  }
  return before;
}

// In one whole warp: ranks the th.count (<= kRankWarp) keys of the final bin, each with its candidate
// index, by key and then earlier index. The lane of the member ranked th.remaining - 1 writes the
// final threshold: exactly its key, taking the equal keys up to and including it.
__device__ __forceinline__ void rank_bin_members(const uint32_t* member_key, const int* member_index, Threshold th,
                                                 Threshold* out) {
  const int lane = threadIdx.x % 32;
  const uint32_t key = lane < th.count ? member_key[lane] : 0u;
  const int index = lane < th.count ? member_index[lane] : 0;
  int rank = 0, ties_through = 0;
#pragma unroll
  for (int m = 0; m < kRankWarp; ++m) {
    const uint32_t km = __shfl_sync(0xffffffffu, key, m);
    const int im = __shfl_sync(0xffffffffu, index, m);
    if (m < th.count) {
      rank += km > key || (km == key && im < index);
      ties_through += km == key && im <= index;
    }
  }
  if (lane < th.count && rank == th.remaining - 1) *out = {key, ~0u, ties_through, 0};
}

// A digit bin holding at most this many keys is gathered after its pass: when its keys are all equal
// (ties: duplicate pages) the threshold is found without more passes.
constexpr int kGatherBin = 256;

// What select_threshold keeps in shared memory besides its histogram.
struct SelectShared {
  Threshold threshold;
  int2 warp_totals[32];
  uint32_t member_key[kGatherBin];
  int member_index[kGatherBin];
  int member_count;
  uint32_t member_lo, member_hi;  // the gathered keys' range
};

// Block-wide (WARPS warps): after a pass histogrammed the `bits`-wide digit at bit `bottom`,
// narrows th to the bin, counted from the top, where the running count reaches th.remaining. Thread
// t owns the OWN bins that come t-th from the top: a block scan of the owners' sums finds the owner,
// which walks its bins from registers; every owner zeroes its bins for the next pass. The caller
// reads sh.threshold after a barrier.
template <int WARPS>
__device__ __forceinline__ void narrow_to_bin_block(int* hist, int bottom, int bits, Threshold th, SelectShared& sh) {
  constexpr int OWN = kSelectBins / (WARPS * 32);
  static_assert(OWN % 4 == 0 && OWN * WARPS * 32 == kSelectBins, "each thread owns whole int4s of bins");
  const int base = kSelectBins - OWN * (threadIdx.x + 1);
  int4* mine = reinterpret_cast<int4*>(hist + base);
  int4 c[OWN / 4];
  int total = 0;
#pragma unroll
  for (int i = 0; i < OWN / 4; ++i) {
    c[i] = mine[i];
    total += c[i].x + c[i].y + c[i].z + c[i].w;
  }
  const int before = block_exclusive_sum<WARPS>(make_int2(total, 0), sh.warp_totals).x;
  if (before < th.remaining && before + total >= th.remaining) {
    // Bins base + OWN - 1 down to base, highest first.
    int above = before, bin = 0, count = 0;
    bool found = false;
#pragma unroll
    for (int i = OWN - 1; i >= 0; --i) {
      const int4 q = c[i / 4];
      const int n = (i % 4 == 0) ? q.x : (i % 4 == 1) ? q.y : (i % 4 == 2) ? q.z : q.w;
      if (!found && above + n >= th.remaining) found = true, bin = base + i, count = n;
      if (!found) above += n;
    }
    sh.threshold = {th.prefix | (uint32_t(bin) << bottom), th.mask | (((2u << (bits - 1)) - 1u) << bottom),
                    th.remaining - above, count};
  }
#pragma unroll
  for (int i = 0; i < OWN / 4; ++i) mine[i] = make_int4(0, 0, 0, 0);
}

// Block-wide (WARPS warps): the threshold of the k largest of `total` candidates (0 < k < total),
// whose (order key, page id) pairs are cand[0 .. total) in shared memory and whose keys all lie in
// [lo, hi]. `hist` (kSelectBins ints) is zero on entry and on return. After each pass a bin of at
// most kGatherBin keys is gathered (warp ballots, one atomic a warp): all equal, it is the threshold;
// at most kRankWarp, one warp ranks them; else the next pass narrows it.
template <int WARPS>
__device__ __forceinline__ Threshold select_threshold(const uint2* cand, int total, int k, uint32_t lo, uint32_t hi,
                                                      int* hist, SelectShared& sh) {
  const int lane = threadIdx.x % 32;
  if (threadIdx.x == 0) sh.member_count = 0, sh.member_lo = ~0u, sh.member_hi = 0u;  // ordered by the pass's barrier
  int top = 32 - __clz(lo ^ hi);  // bits above `top` are the same in every key
  const uint32_t common = top == 32 ? 0u : ~0u << top;
  Threshold th{hi & common, common, k, total};
  while (top > 0 && th.count > th.remaining) {
    const int bits = min(top, 12), bottom = top - bits;
    const uint32_t digit = (2u << (bits - 1)) - 1u;
#pragma unroll 4
    for (int j = threadIdx.x; j < total; j += WARPS * 32) {
      const uint32_t key = cand[j].x;
      if ((key & th.mask) == th.prefix) atomicAdd(&hist[(key >> bottom) & digit], 1);
    }
    __syncthreads();
    narrow_to_bin_block<WARPS>(hist, bottom, bits, th, sh);
    __syncthreads();
    th = sh.threshold;
    top = bottom;
    if (top > 0 && th.count > th.remaining && th.count <= kGatherBin) {
      for (int j0 = 0; j0 < total; j0 += WARPS * 32) {  // warp-uniform trip count: the ballots see every lane
        const int j = j0 + threadIdx.x;
        const uint32_t key = j < total ? cand[j].x : 0u;
        const bool member = j < total && (key & th.mask) == th.prefix;
        const uint32_t members = __ballot_sync(0xffffffffu, member);
        if (members == 0u) continue;
        int base = 0;
        if (lane == 0) base = atomicAdd(&sh.member_count, __popc(members));
        base = __shfl_sync(0xffffffffu, base, 0);
        if (member) {
          const int slot = base + __popc(members & ((1u << lane) - 1u));
          sh.member_key[slot] = key;
          sh.member_index[slot] = j;
          atomicMin(&sh.member_lo, key);
          atomicMax(&sh.member_hi, key);
        }
      }
      __syncthreads();
      if (sh.member_lo == sh.member_hi) {
        th = {sh.member_lo, ~0u, th.remaining, th.count};  // one key: take the first `remaining` of its copies
        break;
      }
      if (th.count <= kRankWarp) {
        if (threadIdx.x < 32) rank_bin_members(sh.member_key, sh.member_index, th, &sh.threshold);
        __syncthreads();
        th = sh.threshold;
        break;
      }
      __syncthreads();  // every thread has read the range before the next gather resets it
      if (threadIdx.x == 0) sh.member_count = 0, sh.member_lo = ~0u, sh.member_hi = 0u;
    }
  }
  return th;
}

// Block-wide: calls take(j, slot) for every candidate j (pairs in shared memory, as above) that th
// takes, where slot is its place among the taken in candidate order. Warp w walks a contiguous
// span 32 candidates at a time: ballots order its lanes, one block scan of the spans' counts orders
// the warps.
template <int WARPS, typename Take>
__device__ __forceinline__ void place_taken(const uint2* cand, int total, Threshold th, int2* warp_totals, Take take) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int span = (total + WARPS - 1) / WARPS;
  const int begin = min(warp * span, total), end = min(begin + span, total);
  int above = 0, equal = 0;
#pragma unroll 4
  for (int j = begin + lane; j < end; j += 32) {
    const uint32_t masked = cand[j].x & th.mask;
    above += masked > th.prefix;
    equal += masked == th.prefix;
  }
  above = __reduce_add_sync(0xffffffffu, above);
  equal = __reduce_add_sync(0xffffffffu, equal);
  if (lane == 0) warp_totals[warp] = make_int2(above, equal);
  __syncthreads();
  above = equal = 0;  // now: before this warp's span, then before each batch
#pragma unroll
  for (int w = 0; w < WARPS; ++w) {
    const int2 t = warp_totals[w];
    if (w < warp) above += t.x, equal += t.y;
  }
  const uint32_t earlier = (1u << lane) - 1u;
  for (int j0 = begin; j0 < end; j0 += 32) {  // warp-uniform trip count: the ballots see every lane
    const int j = j0 + lane;
    const uint32_t masked = j < end ? cand[j].x & th.mask : 0u;
    const bool is_above = j < end && masked > th.prefix, is_equal = j < end && masked == th.prefix;
    const uint32_t ab = __ballot_sync(0xffffffffu, is_above), eq = __ballot_sync(0xffffffffu, is_equal);
    const int a = above + __popc(ab & earlier), e = equal + __popc(eq & earlier);
    if (is_above || (is_equal && e < th.remaining)) take(j, a + min(e, th.remaining));
    above += __popc(ab);
    equal += __popc(eq);
  }
}

}  // namespace
}  // namespace kvflash::cuda
