#include "allocator.h"

#include "errors.h"

namespace kvflash {

namespace {
constexpr size_t kSmallGranule = 512;
constexpr size_t kLargeThreshold = size_t(1) << 20;
constexpr size_t kLargeGranule = size_t(2) << 20;

// A cached block may serve a smaller request if the waste stays bounded: up to twice the size for
// small blocks, an eighth for large ones.
bool fits(size_t block, size_t request) {
  return request < kLargeThreshold ? block <= 2 * request : block <= request + request / 8;
}
}  // namespace

size_t CachingAllocator::round_size(size_t bytes) {
  if (bytes == 0) bytes = 1;
  const size_t g = bytes < kLargeThreshold ? kSmallGranule : kLargeGranule;
  return (bytes + g - 1) / g * g;
}

CachingAllocator::~CachingAllocator() {
  std::lock_guard<std::mutex> lock(mutex_);
  release_cached_locked();
}

void* CachingAllocator::allocate(size_t bytes) {
  const size_t size = round_size(bytes);
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = free_blocks_.lower_bound(size);
  if (it != free_blocks_.end() && fits(it->first, size)) {
    void* ptr = it->second;
    const size_t block = it->first;
    free_blocks_.erase(it);
    stats_.cached -= block;
    stats_.in_use += block;
    stats_.peak_in_use = std::max(stats_.peak_in_use, stats_.in_use);
    stats_.allocations++;
    stats_.cache_hits++;
    live_blocks_[ptr] = block;
    return ptr;
  }
  if (stats_.limit && stats_.in_use + stats_.cached + size > stats_.limit) release_cached_locked();
  void* ptr = nullptr;
  if (!stats_.limit || stats_.in_use + size <= stats_.limit) {
    ptr = raw_->allocate(size);
    if (!ptr && stats_.cached) {  // the device is full: give the cache back and try once more
      release_cached_locked();
      ptr = raw_->allocate(size);
    }
  }
  if (!ptr) {
    fail(ErrorCode::OutOfMemory, "Out of memory on ", device_name_, ": could not allocate ", bytes, " bytes (",
         stats_.in_use, " bytes in use", stats_.limit ? ", limit " + std::to_string(stats_.limit) + " bytes" : "",
         ")");
  }
  stats_.in_use += size;
  stats_.peak_in_use = std::max(stats_.peak_in_use, stats_.in_use);
  stats_.allocations++;
  live_blocks_[ptr] = size;
  return ptr;
}

void CachingAllocator::release(void* ptr) {
  if (!ptr) return;
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = live_blocks_.find(ptr);
  if (it == live_blocks_.end()) return;
  const size_t block = it->second;
  live_blocks_.erase(it);
  stats_.in_use -= block;
  stats_.cached += block;
  free_blocks_.emplace(block, ptr);
}

void CachingAllocator::empty_cache() {
  std::lock_guard<std::mutex> lock(mutex_);
  release_cached_locked();
}

void CachingAllocator::set_limit(size_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  stats_.limit = bytes;
}

MemoryStats CachingAllocator::stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

void CachingAllocator::release_cached_locked() {
  for (auto& [size, ptr] : free_blocks_) raw_->release(ptr);
  free_blocks_.clear();
  stats_.cached = 0;
}

}  // namespace kvflash
