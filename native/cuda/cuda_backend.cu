// The CUDA backend: per-device caching allocators and streams, copies between host and device, and
// dispatch of each op to its kernel family.
#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "../core/backend.h"
#include "../core/element_access.h"
#include "../core/quest_steps.h"
#include "append.h"
#include "attention_mass.h"
#include "context.h"
#include "decode.h"
#include "elementwise.h"
#include "prefill.h"
#include "quant.h"
#include "quest.h"
#include "quest_decode.h"

namespace kvflash {
namespace cuda {

void check(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return;
  cudaGetLastError();  // clear the sticky-free error so later calls are not blamed for it
  if (status == cudaErrorMemoryAllocation) fail(ErrorCode::OutOfMemory, "CUDA out of memory in ", what);
  fail(ErrorCode::Cuda, "CUDA error in ", what, ": ", cudaGetErrorString(status));
}

void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

namespace {

struct DeviceMemory : RawMemory {
  void* allocate(size_t bytes) override {
    void* ptr = nullptr;
    if (cudaMalloc(&ptr, bytes) != cudaSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    return ptr;
  }
  void release(void* ptr) override { cudaFree(ptr); }
};

struct PinnedMemory : RawMemory {
  void* allocate(size_t bytes) override {
    void* ptr = nullptr;
    if (cudaMallocHost(&ptr, bytes) != cudaSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    return ptr;
  }
  void release(void* ptr) override { cudaFreeHost(ptr); }
};

// Work queued on a stream; the waiting thread sleeps rather than spins (cudaEventBlockingSync).
struct EventWork : PendingWork {
  explicit EventWork(cudaStream_t stream) {
    KV_CUDA(cudaEventCreateWithFlags(&event, cudaEventDisableTiming | cudaEventBlockingSync));
    KV_CUDA(cudaEventRecord(event, stream));
  }
  ~EventWork() override { cudaEventDestroy(event); }
  void wait() override { KV_CUDA(cudaEventSynchronize(event)); }
  cudaEvent_t event{};
};

struct CudaTimedEvent : TimedEvent {
  explicit CudaTimedEvent(cudaStream_t stream) {
    KV_CUDA(cudaEventCreateWithFlags(&event, cudaEventBlockingSync));
    KV_CUDA(cudaEventRecord(event, stream));
  }
  ~CudaTimedEvent() override { cudaEventDestroy(event); }
  double elapsed_ms_since(const TimedEvent& start) override {
    KV_CUDA(cudaEventSynchronize(event));
    float ms = 0;
    KV_CUDA(cudaEventElapsedTime(&ms, static_cast<const CudaTimedEvent&>(start).event, event));
    return ms;
  }
  cudaEvent_t event{};
};

// An instantiated graph and what it owns: its blocks in the device's allocator (graph `id`).
class CudaGraph final : public CapturedGraph {
 public:
  CudaGraph(cudaGraphExec_t exec, cudaStream_t stream, CachingAllocator* allocator, int id)
      : exec_(exec), stream_(stream), allocator_(allocator), id_(id) {}
  // An executable graph destroyed mid-replay is freed when the replay ends; the blocks go back to a
  // cache whose next users are ordered after that replay on the same stream.
  ~CudaGraph() override {
    cudaGraphExecDestroy(exec_);
    allocator_->release_graph(id_);
  }
  void replay() override { KV_CUDA(cudaGraphLaunch(exec_, stream_)); }

 private:
  cudaGraphExec_t exec_;
  cudaStream_t stream_;
  CachingAllocator* allocator_;
  int id_;
};

struct DeviceState {
  explicit DeviceState(int index) : allocator("cuda:" + std::to_string(index), &memory) {
    KV_CUDA(cudaSetDevice(index));
    KV_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  }
  DeviceMemory memory;
  CachingAllocator allocator;
  cudaStream_t stream{};
  Tensor flush_buffer;  // made on first flush_cache: four times the L2 size, filled once
  Tensor quest_counters;  // the fused Quest decode's row counters (quest_decode.h), zero between launches
  int capturing = 0;      // the graph being captured on `stream`, 0 if none
};

class CudaBackend final : public Backend {
 public:
  CachingAllocator& allocator(const Device& device) override { return state(device).allocator; }
  CachingAllocator& host_staging_allocator() override { return pinned_allocator_; }

  int device_count(std::string* why) override {
    std::lock_guard<std::mutex> lock(mutex_);
    probe_locked();
    if (why) *why = probe_error_;
    return device_count_;
  }

  DeviceInfo device_info(const Device& device) override {
    state(device);
    cudaDeviceProp prop{};
    KV_CUDA(cudaGetDeviceProperties(&prop, device.index));
    return {prop.name, std::to_string(prop.major) + "." + std::to_string(prop.minor)};
  }

  void copy(const Tensor& src, Tensor& dst) override {
    const Device& gpu = src.device().is_cuda() ? src.device() : dst.device();
    const DeviceState& s = state(gpu);
    // A captured host copy would replay from (or into) host memory long since reused.
    KV_CHECK(s.capturing == 0 || (src.device().is_cuda() && dst.device().is_cuda()), Unsupported,
             "Expected device work only while a CUDA graph is captured on ", gpu.name(),
             " but received a copy between host and device memory");
    cudaStream_t stream = s.stream;
    if (src.device().is_cuda() && dst.device().is_cuda() && src.device() != dst.device()) {
      EventWork dst_ready(state(dst.device()).stream);  // earlier work on the destination comes first
      KV_CUDA(cudaStreamWaitEvent(stream, dst_ready.event, 0));
    }
    if (!dst.device().is_cuda()) dst.wait_host_ready();
    KV_CUDA(cudaMemcpyAsync(dst.data(), src.data(), src.nbytes(), cudaMemcpyDefault, stream));
    if (!dst.device().is_cuda()) dst.storage()->pending_fill = std::make_shared<EventWork>(stream);
  }

  void fill(Tensor& dst, double value) override {
    char element[8];
    encode_scalar(dst.dtype(), value, element);
    cuda::launch_fill(dst.data(), element, dtype_size(dst.dtype()), dst.numel(), state(dst.device()).stream);
  }

  void cast(const Tensor& src, Tensor& dst) override {
    cuda::launch_cast(src.dtype(), src.data(), dst.dtype(), dst.data(), src.numel(), state(src.device()).stream);
  }

  void prefill(const Device& device, const PrefillParams& p) override { launch_prefill(p, state(device).stream); }

  void paged_prefill(const Device& device, const PagedPrefillParams& p) override {
    launch_paged_prefill(p, state(device).stream);
  }

  void paged_decode(const Device& device, const DecodeParams& p) override {
    const Tensor workspace = scratch(device, paged_decode_workspace_bytes(p));
    launch_paged_decode(p, workspace.defined() ? workspace.data() : nullptr, state(device).stream);
  }

  void append_paged_kv(const Device& device, const AppendParams& p) override {
    launch_append_paged_kv(p, state(device).stream);
  }

  void attention_mass(const Device& device, const AttentionMassParams& p) override {
    launch_attention_mass(p, state(device).stream);
  }

  void quantize_pages(const Device& device, const QuantizeParams& p) override {
    launch_quantize_pages(p, state(device).stream);
  }

  void dequantize_pages(const Device& device, const DequantizeParams& p) override {
    launch_dequantize_pages(p, state(device).stream);
  }

  void quantized_paged_decode(const Device& device, const QuantDecodeParams& p) override {
    const Tensor workspace = scratch(device, quantized_decode_workspace_bytes(p));
    launch_quantized_paged_decode(p, workspace.defined() ? workspace.data() : nullptr, state(device).stream);
  }

  void quantized_paged_prefill(const Device& device, const QuantPrefillParams& p) override {
    launch_quantized_paged_prefill(p, state(device).stream);
  }

  void quest_update_meta(const Device& device, const QuestMetaParams& p) override {
    launch_quest_update_meta(p, state(device).stream);
  }
  void quest_scores(const Device& device, const QuestScoreParams& p) override {
    launch_quest_scores(p, state(device).stream);
  }
  void topk_pages(const Device& device, const TopkPagesParams& p) override {
    launch_topk_pages(p, state(device).stream);
  }
  void quest_decode(const Device& device, const QuestDecodeParams& p) override {
    if (!quest_decode_fused(p)) return quest_decode_in_steps(*this, device, p);
    DeviceState& s = state(device);
    const size_t counters = quest_decode_counters(p);
    if (!s.quest_counters.defined() || static_cast<size_t>(s.quest_counters.numel()) < counters) {
      // A capture would record the zeroing without running it, and an eager launch would find garbage.
      KV_CHECK(s.capturing == 0, Unsupported, "Expected questDecodeAttention to have run at this batch size before "
               "a graph captures it (its row counters are made on first use) but it had not");
      // Zeroed once; the kernel leaves them zero. A smaller buffer goes back in stream order.
      s.quest_counters = empty({static_cast<int64_t>(counters)}, DType::I32, device);
      fill(s.quest_counters, 0);
    }
    const Tensor workspace = scratch(device, quest_decode_workspace_bytes(p));
    launch_quest_decode(p, workspace.data(), reinterpret_cast<unsigned*>(s.quest_counters.data()), s.stream);
  }

  std::shared_ptr<PendingWork> record(const Device& device) override {
    return std::make_shared<EventWork>(state(device).stream);
  }

  std::shared_ptr<TimedEvent> record_timed(const Device& device) override {
    return std::make_shared<CudaTimedEvent>(state(device).stream);
  }

  void busy_wait(const Device& device, double ms) override { cuda::launch_busy_wait(ms, state(device).stream); }

  // Relaxed capture: allocations may still reach cudaMalloc (the caching allocator's misses), which
  // the stricter modes refuse.
  void begin_graph_capture(const Device& device) override {
    DeviceState& s = state(device);
    KV_CHECK(s.capturing == 0, Unsupported, "Expected no graph capture in progress on ", device.name(),
             " but one is (graphs do not nest)");
    const int id = next_graph_id_.fetch_add(1) + 1;
    s.allocator.begin_graph(id);
    const cudaError_t status = cudaStreamBeginCapture(s.stream, cudaStreamCaptureModeRelaxed);
    if (status != cudaSuccess) {
      s.allocator.end_graph();
      s.allocator.release_graph(id);
      check(status, "cudaStreamBeginCapture");
    }
    s.capturing = id;
  }

  std::unique_ptr<CapturedGraph> end_graph_capture(const Device& device) override {
    DeviceState& s = state(device);
    KV_CHECK(s.capturing != 0, Unsupported, "Expected a graph capture in progress on ", device.name(), " but none is");
    const int id = s.capturing;
    s.capturing = 0;
    s.allocator.end_graph();
    cudaGraph_t graph = nullptr;
    const cudaError_t status = cudaStreamEndCapture(s.stream, &graph);
    cudaGraphExec_t exec = nullptr;
    const cudaError_t made = status == cudaSuccess ? cudaGraphInstantiate(&exec, graph, 0) : status;
    if (graph) cudaGraphDestroy(graph);
    if (made != cudaSuccess) {
      cudaGetLastError();
      s.allocator.release_graph(id);
      fail(ErrorCode::Cuda, "Could not capture the work as a CUDA graph (", cudaGetErrorString(made),
           "): inside a capture, ops may only queue device work (no host copies, no waiting for the device)");
    }
    return std::make_unique<CudaGraph>(exec, s.stream, &s.allocator, id);
  }

  void flush_cache(const Device& device) override {
    DeviceState& s = state(device);
    if (!s.flush_buffer.defined()) {
      int l2_bytes = 0;
      KV_CUDA(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device.index));
      s.flush_buffer = empty({std::max<int64_t>(int64_t(l2_bytes) * 4, 64 << 20)}, DType::U8, device);
      fill(s.flush_buffer, 1);
    }
    cuda::launch_read_through(s.flush_buffer.data(), s.flush_buffer.nbytes(), s.stream);
  }

  // Scratch for split-K partials, from the caching allocator so steady decoding reuses it; freed
  // when the op returns, which is safe because later work on the stream runs after the kernel.
  Tensor scratch(const Device& device, size_t bytes) {
    return bytes ? empty({static_cast<int64_t>(bytes)}, DType::U8, device) : Tensor();
  }

  DeviceState& state(const Device& device) {
    std::lock_guard<std::mutex> lock(mutex_);
    probe_locked();
    KV_CHECK(device_count_ > 0, Device, "Expected a CUDA device for a cuda tensor but none is usable: ", probe_error_);
    KV_CHECK(device.index < device_count_, Device, "Expected a device index below ", device_count_,
             " but received ", device.name());
    auto& slot = states_[static_cast<size_t>(device.index)];
    if (!slot) slot = std::make_unique<DeviceState>(device.index);
    KV_CUDA(cudaSetDevice(device.index));
    return *slot;
  }

 private:
  void probe_locked() {
    if (probed_) return;
    probed_ = true;
    const cudaError_t status = cudaGetDeviceCount(&device_count_);
    if (status != cudaSuccess) {
      cudaGetLastError();
      device_count_ = 0;
      probe_error_ = cudaGetErrorString(status);
    } else if (device_count_ == 0) {
      probe_error_ = "no CUDA device found";
    }
    states_.resize(static_cast<size_t>(device_count_));
  }

  std::mutex mutex_;
  std::atomic<int> next_graph_id_{0};
  bool probed_ = false;
  int device_count_ = 0;
  std::string probe_error_;
  std::vector<std::unique_ptr<DeviceState>> states_;
  PinnedMemory pinned_memory_;
  CachingAllocator pinned_allocator_{"cpu (pinned)", &pinned_memory_};
};

// Never destroyed: at process exit the CUDA runtime may already be gone, and the OS reclaims all.
CudaBackend& the_backend() {
  static CudaBackend* backend = new CudaBackend();
  return *backend;
}

}  // namespace

cudaStream_t stream_for(const Device& device) { return the_backend().state(device).stream; }

}  // namespace cuda

Backend& cuda_backend() { return cuda::the_backend(); }
bool has_cuda_backend() { return true; }

}  // namespace kvflash
