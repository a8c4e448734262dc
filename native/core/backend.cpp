#include "backend.h"

namespace kvflash {

Backend& backend_for(const Device& device) { return device.is_cuda() ? cuda_backend() : cpu_backend(); }

namespace {
Tensor empty_from(CachingAllocator& alloc, const Shape& shape, DType dtype, const Device& device) {
  const size_t bytes = static_cast<size_t>(Tensor::numel_of(shape)) * dtype_size(dtype);
  void* data = alloc.allocate(bytes);
  return Tensor(std::make_shared<Storage>(data, bytes, device, &alloc), 0, dtype, shape);
}
}  // namespace

Tensor empty(const Shape& shape, DType dtype, const Device& device) {
  return empty_from(backend_for(device).allocator(device), shape, dtype, device);
}

Tensor to_device(const Tensor& src, const Device& device) {
  if (!src.device().is_cuda() && !device.is_cuda()) {
    Tensor dst = empty(src.shape(), src.dtype(), device);
    cpu_backend().copy(src, dst);
    return dst;
  }
  // A copy that touches a GPU is the CUDA backend's; downloads land in its pinned staging memory
  // so that they do not block the caller.
  Backend& cuda = cuda_backend();
  Tensor dst = device.is_cuda() ? empty(src.shape(), src.dtype(), device)
                                : empty_from(cuda.host_staging_allocator(), src.shape(), src.dtype(), device);
  cuda.copy(src, dst);
  return dst;
}

}  // namespace kvflash
