// Programmatic dependent launch (compute 9+): a kernel launched this way may start while the
// previous grid on its stream is still running, so back-to-back kernels (Quest's scores, top-k and
// sparse decode; a split decode and its merge) overlap their launch latency. Such a kernel must
// wait (griddepcontrol.wait) before it reads anything the previous grid wrote.
#pragma once
#include <cuda_runtime.h>

#include "context.h"

namespace kvflash::cuda {

// In a kernel: lets the next grid on the stream launch now; it still waits for all of this grid's writes.
__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// In a kernel launched early: blocks until the previous grid has finished and its writes are visible.
__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Whether the current device launches programmatically (compute capability 9 or more).
inline bool device_has_pdl() {
  int device = 0, major = 0;
  KV_CUDA(cudaGetDevice(&device));
  KV_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 9;
}

// Launches `kernel`, as a programmatic dependent launch when `pdl` (else an ordinary one).
template <typename... Params, typename... Args>
void launch_programmatic(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, bool pdl,
                         cudaStream_t stream, Args... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attr;
  config.numAttrs = pdl ? 1 : 0;
  KV_CUDA(cudaLaunchKernelEx(&config, kernel, args...));
}

}  // namespace kvflash::cuda
