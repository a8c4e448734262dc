#include "allocator.h"

#include <algorithm>
#include <iterator>

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

// Takes a block that fits `size` out of `pool` (its size into *block), or returns nullptr.
void* take_cached(std::multimap<size_t, void*>& pool, size_t size, size_t* block) {
  auto it = pool.lower_bound(size);
  if (it == pool.end() || !fits(it->first, size)) return nullptr;
  void* ptr = it->second;
  *block = it->first;
  pool.erase(it);
  return ptr;
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
  void* ptr = allocate_locked(size, bytes);
  if (capturing_) graph_of_[ptr] = capturing_;
  return ptr;
}

void* CachingAllocator::allocate_locked(size_t size, size_t bytes) {
  size_t block = 0;
  void* ptr = capturing_ ? take_cached(graph_free_[capturing_], size, &block) : nullptr;
  if (!ptr) ptr = take_cached(free_blocks_, size, &block);
  if (ptr) {
    stats_.cached -= block;
    stats_.in_use += block;
    stats_.peak_in_use = std::max(stats_.peak_in_use, stats_.in_use);
    stats_.allocations++;
    stats_.cache_hits++;
    live_blocks_[ptr] = block;
    return ptr;
  }
  if (stats_.limit && stats_.in_use + stats_.cached + size > stats_.limit) release_cached_locked();
  if (!stats_.limit || stats_.in_use + size <= stats_.limit) {
    ptr = raw_->allocate(size);
    if (!ptr && !free_blocks_.empty()) {  // the device is full: give the cache back and try once more
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
  const auto owner = graph_of_.find(ptr);
  (owner == graph_of_.end() ? free_blocks_ : graph_free_[owner->second]).emplace(block, ptr);
}

void CachingAllocator::begin_graph(int id) {
  std::lock_guard<std::mutex> lock(mutex_);
  capturing_ = id;
}

void CachingAllocator::end_graph() {
  std::lock_guard<std::mutex> lock(mutex_);
  capturing_ = 0;
}

void CachingAllocator::release_graph(int id) {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto pool = graph_free_.find(id);
  if (pool != graph_free_.end()) {
    for (const auto& [size, ptr] : pool->second) {
      graph_of_.erase(ptr);
      free_blocks_.emplace(size, ptr);
    }
    graph_free_.erase(pool);
  }
  for (auto it = graph_of_.begin(); it != graph_of_.end();) it = it->second == id ? graph_of_.erase(it) : std::next(it);
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

// Graphs' freed blocks stay: their replays may still write them.
void CachingAllocator::release_cached_locked() {
  for (auto& [size, ptr] : free_blocks_) {
    raw_->release(ptr);
    stats_.cached -= size;
  }
  free_blocks_.clear();
}

}  // namespace kvflash
