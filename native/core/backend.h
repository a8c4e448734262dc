// The one place ops are dispatched: each device type has a Backend, and every op is a method on it.
// The CPU backend is the reference; the CUDA backend is compiled in only when nvcc was found.
// Ops take tensors already checked by the binding (dtype, device, shape) and never allocate pages
// or know about sequences.
#pragma once
#include <memory>
#include <string>

#include "attention_params.h"
#include "quant_format.h"
#include "quest_params.h"
#include "tensor.h"

namespace kvflash {

struct DeviceInfo {
  std::string name;                 // "NVIDIA H100 80GB HBM3"
  std::string compute_capability;  // "9.0"
};

// Work captured from a device's stream (a CUDA graph), replayed on that stream. Destroying it returns
// the blocks it owns to the device's cache, ordered after its replays.
struct CapturedGraph {
  virtual ~CapturedGraph() = default;
  virtual void replay() = 0;
};

// A point in a device's stream of work, for timing: elapsed_ms_since waits (blocking) until both
// points have passed.
struct TimedEvent {
  virtual ~TimedEvent() = default;
  virtual double elapsed_ms_since(const TimedEvent& start) = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual CachingAllocator& allocator(const Device& device) = 0;
  // Host memory this backend's devices copy into without blocking the caller (pinned for CUDA).
  virtual CachingAllocator& host_staging_allocator() = 0;
  // Number of usable devices of this type, or 0 with the reason in *why.
  virtual int device_count(std::string* why) = 0;
  virtual DeviceInfo device_info(const Device& device) = 0;

  // Copies src's bytes into dst (same byte count). One side may be host memory; the copy is
  // ordered after earlier work on the device. A device-to-host copy sets dst's pending_fill.
  virtual void copy(const Tensor& src, Tensor& dst) = 0;
  virtual void fill(Tensor& dst, double value) = 0;
  // Element-wise conversion between any two dtypes of the same element count (round to nearest
  // even for floats, saturation as dtype.h defines, truncation toward zero for float -> integer).
  virtual void cast(const Tensor& src, Tensor& dst) = 0;
  // Work queued so far on the device; wait() on the result blocks until it is done.
  virtual std::shared_ptr<PendingWork> record(const Device& device) = 0;

  // Attention (attention_params.h has the layouts). Inputs were checked by the binding.
  virtual void prefill(const Device& device, const PrefillParams& p) = 0;
  virtual void paged_prefill(const Device& device, const PagedPrefillParams& p) = 0;
  virtual void paged_decode(const Device& device, const DecodeParams& p) = 0;
  virtual void append_paged_kv(const Device& device, const AppendParams& p) = 0;
  virtual void attention_mass(const Device& device, const AttentionMassParams& p) = 0;

  // Quest (quest_params.h).
  virtual void quest_update_meta(const Device& device, const QuestMetaParams& p) = 0;
  virtual void quest_scores(const Device& device, const QuestScoreParams& p) = 0;
  virtual void topk_pages(const Device& device, const TopkPagesParams& p) = 0;
  // The three above as one decode step (quest_steps.h runs them one by one).
  virtual void quest_decode(const Device& device, const QuestDecodeParams& p) = 0;

  // Quantized KV cache (quant_format.h has the formats and layouts).
  virtual void quantize_pages(const Device& device, const QuantizeParams& p) = 0;
  virtual void dequantize_pages(const Device& device, const DequantizeParams& p) = 0;
  virtual void quantized_paged_decode(const Device& device, const QuantDecodeParams& p) = 0;
  virtual void quantized_paged_prefill(const Device& device, const QuantPrefillParams& p) = 0;

  // A timing point after the work queued so far.
  virtual std::shared_ptr<TimedEvent> record_timed(const Device& device) = 0;

  // Test support: keeps the device busy for about `ms` milliseconds.
  virtual void busy_wait(const Device& device, double ms) = 0;
  // Benchmark support: evicts the device's cache by reading (not writing) a buffer several times its size.
  virtual void flush_cache(const Device& device) = 0;

  // Graph capture: the work queued on the device between begin and end is recorded, not run, and
  // end returns it as a replayable graph (or throws, capture over, when the work could not be captured).
  virtual void begin_graph_capture(const Device& device) = 0;
  virtual std::unique_ptr<CapturedGraph> end_graph_capture(const Device& device) = 0;
};

Backend& cpu_backend();
// Throws E_DEVICE when the binary was built without CUDA.
Backend& cuda_backend();
bool has_cuda_backend();
Backend& backend_for(const Device& device);

// A new, uninitialised tensor from the device's caching allocator.
Tensor empty(const Shape& shape, DType dtype, const Device& device);
// Moves a tensor to another device (a copy even when the device is the same).
Tensor to_device(const Tensor& src, const Device& device);

}  // namespace kvflash
