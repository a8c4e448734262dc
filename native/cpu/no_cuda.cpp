// Linked into the CPU-only build in place of native/cuda: any cuda tensor is a clear E_DEVICE.
#include "../core/backend.h"

namespace kvflash {

Backend& cuda_backend() {
  fail(ErrorCode::Device, "Expected a CUDA build of kvflash for a cuda tensor but this is the CPU-only build");
}

bool has_cuda_backend() { return false; }

}  // namespace kvflash
