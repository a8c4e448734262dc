// A caching allocator, one per device and memory kind. Freed blocks go to a cache and serve later
// requests of a similar size, so steady-state decoding never calls cudaMalloc/cudaFree (which
// synchronize the device). The same code serves host memory, so its policy is tested without a GPU.
#pragma once
#include <cstddef>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

namespace kvflash {

// The memory a CachingAllocator carves out: cudaMalloc, cudaMallocHost or aligned malloc.
struct RawMemory {
  virtual ~RawMemory() = default;
  virtual void* allocate(size_t bytes) = 0;  // nullptr when the device has no more
  virtual void release(void* ptr) = 0;
};

struct MemoryStats {
  size_t in_use = 0;        // bytes of blocks handed out
  size_t cached = 0;        // bytes of freed blocks kept for reuse
  size_t peak_in_use = 0;   // high-water mark of in_use
  size_t limit = 0;         // cap on in_use + cached; 0 = none
  size_t allocations = 0;   // blocks handed out
  size_t cache_hits = 0;    // of which served from the cache
};

class CachingAllocator {
 public:
  CachingAllocator(std::string device_name, RawMemory* raw) : device_name_(std::move(device_name)), raw_(raw) {}
  ~CachingAllocator();
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;

  // Throws E_OOM (naming the request and the stats) when neither the cache nor the device can serve it.
  void* allocate(size_t bytes);
  void release(void* ptr);
  // Returns every cached block to the device.
  void empty_cache();
  void set_limit(size_t bytes);
  MemoryStats stats();

  // Rounding keeps the number of distinct block sizes small, so freed blocks match later requests.
  static size_t round_size(size_t bytes);

  // CUDA graph capture: the blocks handed out while graph `id` is captured belong to it, since its
  // replays write them. Freed, they stay with the graph and serve only its own later requests until
  // release_graph(id) returns them to the cache; those still live then become ordinary blocks.
  void begin_graph(int id);
  void end_graph();
  void release_graph(int id);

 private:
  void* allocate_locked(size_t size, size_t bytes);
  void release_cached_locked();

  std::string device_name_;
  RawMemory* raw_;
  std::mutex mutex_;
  std::multimap<size_t, void*> free_blocks_;       // block size -> block
  std::unordered_map<void*, size_t> live_blocks_;  // block -> block size
  int capturing_ = 0;                              // the graph being captured, 0 if none
  std::unordered_map<void*, int> graph_of_;        // block -> the graph that owns it
  std::unordered_map<int, std::multimap<size_t, void*>> graph_free_;  // graph -> its freed blocks
  MemoryStats stats_;
};

}  // namespace kvflash
