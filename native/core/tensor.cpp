#include "tensor.h"

#include <sstream>

namespace kvflash {

std::string shape_str(const Shape& shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

Tensor Tensor::slice0(int64_t start, int64_t end) const {
  KV_CHECK(dim() >= 1, Shape, "Expected a tensor of rank >= 1 to slice but received rank 0");
  KV_CHECK(0 <= start && start <= end && end <= shape_[0], Range, "Expected 0 <= start <= end <= ", shape_[0],
           " for slice but received start ", start, ", end ", end);
  Shape shape = shape_;
  shape[0] = end - start;
  const size_t row_bytes = static_cast<size_t>(numel_of(Shape(shape_.begin() + 1, shape_.end()))) * dtype_size(dtype_);
  return Tensor(storage_, offset_ + static_cast<size_t>(start) * row_bytes, dtype_, shape);
}

Tensor Tensor::reshape(const Shape& shape) const {
  KV_CHECK(numel_of(shape) == numel(), Shape, "Expected a shape with ", numel(), " elements for reshape of ",
           describe(), " but received ", shape_str(shape));
  return Tensor(storage_, offset_, dtype_, shape);
}

Tensor Tensor::reinterpret(DType dtype, const Shape& shape) const {
  const size_t bytes = static_cast<size_t>(numel_of(shape)) * dtype_size(dtype);
  KV_CHECK(bytes == nbytes(), Shape, "Expected ", nbytes(), " bytes for reinterpret of ", describe(), " but received ",
           dtype_name(dtype), " ", shape_str(shape), " (", bytes, " bytes)");
  return Tensor(storage_, offset_, dtype, shape);
}

std::string Tensor::describe() const {
  return std::string(dtype_name(dtype_)) + " " + shape_str(shape_) + " on " + device().name();
}

void Tensor::wait_host_ready() const {
  if (storage_ && storage_->pending_fill) {
    storage_->pending_fill->wait();
    storage_->pending_fill.reset();
  }
}

}  // namespace kvflash
