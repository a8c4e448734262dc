#include "../core/element_access.h"
#include "elementwise.h"

namespace kvflash::cuda {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t count) {
  const int64_t blocks = (count + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65535 * 8 ? blocks : 65535 * 8);  // grid-stride loops cover the rest
}

struct Element {
  unsigned char bytes[8];
};

__global__ void fill_kernel(unsigned char* dst, Element element, int width, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    for (int b = 0; b < width; ++b) dst[i * width + b] = element.bytes[b];
  }
}

// One kernel for every dtype pair: the switch is uniform across a warp, and a cast is never hot.
__global__ void cast_kernel(DType from, const void* src, DType to, void* dst, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    cast_element(from, src, to, dst, i);
  }
}

__global__ void busy_wait_kernel(uint64_t ns) {
  uint64_t start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    __nanosleep(1000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < ns);
}

__global__ void read_through_kernel(const uint4* buffer, size_t count, uint4* never) {
  uint32_t acc = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < count; i += size_t(gridDim.x) * blockDim.x) {
    const uint4 v = __ldcg(buffer + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u && never) *never = make_uint4(acc, 0, 0, 0);  // keeps the loads; never taken on poison data
}

}  // namespace

void launch_fill(void* dst, const void* element, size_t width, int64_t count, cudaStream_t stream) {
  if (count == 0) return;
  Element e{};
  memcpy(e.bytes, element, width);
  fill_kernel<<<blocks_for(count), kThreads, 0, stream>>>(static_cast<unsigned char*>(dst), e,
                                                           static_cast<int>(width), count);
  check_launch("fill_kernel");
}

void launch_cast(DType from, const void* src, DType to, void* dst, int64_t count, cudaStream_t stream) {
  if (count == 0) return;
  cast_kernel<<<blocks_for(count), kThreads, 0, stream>>>(from, src, to, dst, count);
  check_launch("cast_kernel");
}

void launch_read_through(const void* buffer, size_t bytes, cudaStream_t stream) {
  read_through_kernel<<<1024, kThreads, 0, stream>>>(static_cast<const uint4*>(buffer), bytes / 16, nullptr);
  check_launch("read_through_kernel");
}

void launch_busy_wait(double ms, cudaStream_t stream) {
  busy_wait_kernel<<<1, 1, 0, stream>>>(static_cast<uint64_t>(ms * 1e6));
  check_launch("busy_wait_kernel");
}

}  // namespace kvflash::cuda
