// The tensor every layer passes around: a typed, contiguous, row-major view into refcounted storage.
// Views along dim 0 share storage; the storage returns its block to the allocator when the last
// tensor that refers to it lets go (dispose() in JS does that at once).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "allocator.h"
#include "device.h"
#include "dtype.h"

namespace kvflash {

using Shape = std::vector<int64_t>;

// Device work that has been queued but may not have finished: a copy into host memory, or a
// synchronization point. wait() blocks, so the binding calls it from a worker thread.
struct PendingWork {
  virtual ~PendingWork() = default;
  virtual void wait() = 0;
};

struct Storage {
  Storage(void* data, size_t bytes, Device device, CachingAllocator* owner)
      : data(data), bytes(bytes), device(device), owner(owner) {}
  ~Storage() {
    if (owner) owner->release(data);
  }
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  void* data;
  size_t bytes;
  Device device;
  CachingAllocator* owner;  // null for borrowed memory (a JS buffer during one call)
  // Set on host storage that a device-to-host copy is still filling; host readers wait on it first.
  std::shared_ptr<PendingWork> pending_fill;
};

class Tensor {
 public:
  Tensor() = default;
  Tensor(std::shared_ptr<Storage> storage, size_t offset, DType dtype, Shape shape)
      : storage_(std::move(storage)), offset_(offset), dtype_(dtype), shape_(std::move(shape)) {}

  bool defined() const { return storage_ != nullptr; }
  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  int dim() const { return static_cast<int>(shape_.size()); }
  int64_t size(int d) const { return shape_[static_cast<size_t>(d)]; }
  Device device() const { return storage_->device; }
  int64_t numel() const { return numel_of(shape_); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  const std::shared_ptr<Storage>& storage() const { return storage_; }

  void* data() const { return static_cast<char*>(storage_->data) + offset_; }
  template <typename T>
  T* data_as() const {
    return static_cast<T*>(data());
  }

  // Rows [start, end) of dim 0, sharing storage.
  Tensor slice0(int64_t start, int64_t end) const;
  // The same elements under another shape.
  Tensor reshape(const Shape& shape) const;
  // The same bytes as another dtype and shape.
  Tensor reinterpret(DType dtype, const Shape& shape) const;
  // "bf16 [4, 8] on cuda:0", for error messages.
  std::string describe() const;

  // Blocks until any device-to-host copy into this (host) tensor has landed. Main thread only: it
  // clears the storage's pending_fill.
  void wait_host_ready() const;

  static int64_t numel_of(const Shape& shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }

 private:
  std::shared_ptr<Storage> storage_;
  size_t offset_ = 0;
  DType dtype_ = DType::F32;
  Shape shape_;
};

std::string shape_str(const Shape& shape);

}  // namespace kvflash
