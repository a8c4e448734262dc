// What every CUDA kernel family needs from the runtime: error checks that become E_CUDA, and the
// device's stream (one per device: ops are ordered on it, so the caching allocator may reuse a
// freed block at once, as PyTorch's does).
#pragma once
#include <cuda_runtime.h>

#include "../core/device.h"

namespace kvflash::cuda {

// Throws E_CUDA naming the failed call and CUDA's message.
void check(cudaError_t status, const char* what);
// After a launch: surfaces launch-configuration errors at the op that caused them.
void check_launch(const char* kernel);
// Makes `device` current on this thread and returns its stream.
cudaStream_t stream_for(const Device& device);

}  // namespace kvflash::cuda

#define KV_CUDA(expr) ::kvflash::cuda::check((expr), #expr)
