// PTX wrappers for the Hopper-only (sm_90a) data path: mbarriers, bulk tensor copies (TMA) and
// warpgroup matrix multiplies (wgmma). Callers compile them only under __CUDA_ARCH_FEAT_SM90_ALL.
//
// Shared-memory tiles use the 128-byte swizzle that both TMA and wgmma understand: a tile of rows of
// 64 16-bit elements (128 bytes) in which the 16-byte chunk c of row r sits at chunk c ^ (r & 7),
// with the tile starting on a 1024-byte boundary. Wider rows are stored as several such tiles, one
// per 64 columns.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "ptx.cuh"

namespace kvflash::cuda::sm90 {

// ---------------------------------------------------------------------------------------------
// mbarriers. A full barrier completes a phase once its expected arrivals and transaction bytes
// are in; waiters name the parity of the phase they wait for.

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals));
}
// Makes initialised barriers visible to the async proxy (the TMA unit) before first use.
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// One arrival that also announces `bytes` of TMA traffic still to land in this phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

// ---------------------------------------------------------------------------------------------
// TMA: one box of a 3-d tensor map (coordinates innermost first) into shared memory, completing
// on `bar`. Elements outside the tensor arrive as zeros.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const void* tensor_map, int c0, int c1, int c2,
                                            uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}

// ---------------------------------------------------------------------------------------------
// Registers: a warpgroup that only issues copies gives most of its registers to the ones that
// compute. Takes effect only under a launch bound with one block per SM.
template <int N>
__device__ __forceinline__ void regs_shrink() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void regs_grow() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

// Named barriers for `threads` threads (a multiple of 32): sync waits, arrive only counts.
__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Orders this thread's ordinary shared-memory accesses before later async-proxy ones (wgmma
// operand reads, TMA writes) of the same memory.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// ---------------------------------------------------------------------------------------------
// wgmma. A shared-memory operand is a 64-bit descriptor: start address, the byte distance between
// 8-row groups (stride) and, for MN-major operands, between 64-column groups (leading), all in
// 16-byte units, and the swizzle mode (1 = 128 bytes).
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t leading_bytes, uint32_t stride_bytes) {
  return static_cast<uint64_t>((addr & 0x3ffff) >> 4) | (static_cast<uint64_t>(leading_bytes >> 4) << 16) |
         (static_cast<uint64_t>(stride_bytes >> 4) << 32) | (1ull << 62);
}

// Accumulator registers and their async use: fence before issuing once registers were written,
// commit the issued batch as a group, wait until at most N groups are still in flight.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Pins registers in place around async matrix work: the compiler may not move their reads or
// writes across this point, nor reuse them while an issued wgmma still reads or writes them.
template <int N>
__device__ __forceinline__ void hold(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void hold(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

#define KV_ACC8(d, i) \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define KV_ACC64(d) \
  KV_ACC8(d, 0), KV_ACC8(d, 8), KV_ACC8(d, 16), KV_ACC8(d, 24), KV_ACC8(d, 32), KV_ACC8(d, 40), KV_ACC8(d, 48), KV_ACC8(d, 56)
#define KV_ACC64_LIST                                                                                                  \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, "  \
  "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

// D[64 x 128] (+)= A[64 x 16] B[16 x 128], f32 accumulators in the m64nNk16 fragment layout: warp w
// of the warpgroup holds rows 16w + lane / 4 (registers 4j, 4j + 1) and + 8 (4j + 2, 4j + 3), at
// columns 8j + 2 (lane % 4) + {0, 1}. The element type picks the instruction.
template <typename T>
struct Wgmma;

#define KV_DEFINE_WGMMA(CTYPE, PTX)                                                                                \
  template <>                                                                                                      \
  struct Wgmma<CTYPE> {                                                                                            \
    /* A and B from shared memory, both K-major; accumulate = 0 overwrites D. */                                   \
    static __device__ __forceinline__ void ss(float (&d)[64], uint64_t a, uint64_t b, int accumulate) {            \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\nwgmma.mma_async.sync.aligned.m64n128k16.f32." PTX \
                   "." PTX " " KV_ACC64_LIST ", %64, %65, p, 1, 1, 0, 0;\n}\n"                                     \
                   : KV_ACC64(d)                                                                                   \
                   : "l"(a), "l"(b), "r"(accumulate));                                                             \
    }                                                                                                              \
    /* A from registers (the mma.sync m16n8k16 A layout per warp), B MN-major from shared memory. */               \
    static __device__ __forceinline__ void rs(float (&d)[64], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, \
                                              uint64_t b) {                                                        \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\nwgmma.mma_async.sync.aligned.m64n128k16.f32." PTX \
                   "." PTX " " KV_ACC64_LIST ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                       \
                   : KV_ACC64(d)                                                                                   \
                   : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(b), "r"(1));                                          \
    }                                                                                                              \
  };
KV_DEFINE_WGMMA(__nv_bfloat16, "bf16")
KV_DEFINE_WGMMA(__half, "f16")
#undef KV_DEFINE_WGMMA
#undef KV_ACC64_LIST
#undef KV_ACC64
#undef KV_ACC8

}  // namespace kvflash::cuda::sm90
