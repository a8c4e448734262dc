// The reference backend: plain C++ over host memory, synchronous, float32 arithmetic.
#include <chrono>
#include <cstdlib>
#include <cstring>

#include "../core/backend.h"
#include "../core/element_access.h"
#include "../core/quest_steps.h"
#include "attention.h"
#include "quant.h"
#include "quest.h"

namespace kvflash {
namespace {

// Host work is synchronous, so a timing point is just the clock now.
struct HostTimedEvent : TimedEvent {
  std::chrono::steady_clock::time_point at = std::chrono::steady_clock::now();
  double elapsed_ms_since(const TimedEvent& start) override {
    return std::chrono::duration<double, std::milli>(at - static_cast<const HostTimedEvent&>(start).at).count();
  }
};

struct HostMemory : RawMemory {
  void* allocate(size_t bytes) override {
    // 64-byte alignment: whole cache lines, and enough for any vector load of the host code.
    return std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  }
  void release(void* ptr) override { std::free(ptr); }
};

class CpuBackend final : public Backend {
 public:
  CachingAllocator& allocator(const Device&) override { return allocator_; }
  CachingAllocator& host_staging_allocator() override { return allocator_; }

  int device_count(std::string*) override { return 1; }
  DeviceInfo device_info(const Device&) override { return {"host CPU", ""}; }

  void copy(const Tensor& src, Tensor& dst) override {
    src.wait_host_ready();
    dst.wait_host_ready();
    std::memmove(dst.data(), src.data(), src.nbytes());
  }

  void fill(Tensor& dst, double value) override {
    dst.wait_host_ready();
    const size_t width = dtype_size(dst.dtype());
    char element[8];
    encode_scalar(dst.dtype(), value, element);
    char* bytes = static_cast<char*>(dst.data());
    for (int64_t i = 0; i < dst.numel(); ++i) std::memcpy(bytes + i * width, element, width);
  }

  void cast(const Tensor& src, Tensor& dst) override {
    src.wait_host_ready();
    dst.wait_host_ready();
    const int64_t n = src.numel();
    for (int64_t i = 0; i < n; ++i) cast_element(src.dtype(), src.data(), dst.dtype(), dst.data(), i);
  }

  void prefill(const Device&, const PrefillParams& p) override { cpu::prefill(p); }
  void paged_prefill(const Device&, const PagedPrefillParams& p) override { cpu::paged_prefill(p); }
  void paged_decode(const Device&, const DecodeParams& p) override { cpu::paged_decode(p); }
  void append_paged_kv(const Device&, const AppendParams& p) override { cpu::append_paged_kv(p); }
  void attention_mass(const Device&, const AttentionMassParams& p) override { cpu::attention_mass(p); }
  void quest_update_meta(const Device&, const QuestMetaParams& p) override { cpu::quest_update_meta(p); }
  void quest_scores(const Device&, const QuestScoreParams& p) override { cpu::quest_scores(p); }
  void topk_pages(const Device&, const TopkPagesParams& p) override { cpu::topk_pages(p); }
  void quest_decode(const Device& device, const QuestDecodeParams& p) override {
    quest_decode_in_steps(*this, device, p);
  }
  void quantize_pages(const Device&, const QuantizeParams& p) override { cpu::quantize_pages(p); }
  void dequantize_pages(const Device&, const DequantizeParams& p) override { cpu::dequantize_pages(p); }
  void quantized_paged_decode(const Device&, const QuantDecodeParams& p) override { cpu::quantized_paged_decode(p); }
  void quantized_paged_prefill(const Device&, const QuantPrefillParams& p) override { cpu::quantized_paged_prefill(p); }

  std::shared_ptr<PendingWork> record(const Device&) override { return nullptr; }
  std::shared_ptr<TimedEvent> record_timed(const Device&) override { return std::make_shared<HostTimedEvent>(); }

  void busy_wait(const Device&, double) override {
    fail(ErrorCode::Unsupported, "Expected a cuda device for busy_wait but received cpu");
  }
  void begin_graph_capture(const Device&) override {
    fail(ErrorCode::Unsupported, "Expected a cuda device for graph capture but received cpu");
  }
  std::unique_ptr<CapturedGraph> end_graph_capture(const Device&) override {
    fail(ErrorCode::Unsupported, "Expected a cuda device for graph capture but received cpu");
  }
  void flush_cache(const Device&) override {
    fail(ErrorCode::Unsupported, "Expected a cuda device for flush_cache but received cpu");
  }

 private:
  HostMemory memory_;
  CachingAllocator allocator_{"cpu", &memory_};
};

}  // namespace

Backend& cpu_backend() {
  static CpuBackend backend;
  return backend;
}

}  // namespace kvflash
