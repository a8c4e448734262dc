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

}  // namespace kvflash::cuda
