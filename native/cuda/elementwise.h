// Launchers for the element-wise kernels (fill, cast) and the busy-wait used by tests.
#pragma once
#include <cstdint>

#include "../core/dtype.h"
#include "context.h"

namespace kvflash::cuda {

// Repeats one encoded element (`width` bytes, from encode_scalar) `count` times.
void launch_fill(void* dst, const void* element, size_t width, int64_t count, cudaStream_t stream);
void launch_cast(DType from, const void* src, DType to, void* dst, int64_t count, cudaStream_t stream);
void launch_busy_wait(double ms, cudaStream_t stream);
// Reads `bytes` of `buffer` (16-byte loads, no stores): evicts whatever the L2 cache held without
// leaving dirty lines whose write-back would land in the next op's time.
void launch_read_through(const void* buffer, size_t bytes, cudaStream_t stream);

}  // namespace kvflash::cuda
