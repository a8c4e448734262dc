// The runtime: which build this is, its devices, memory statistics and synchronization.
#include "../core/backend.h"
#include "args.h"
#include "exports.h"
#include "pending_promise.h"

namespace kvflash::binding {
namespace {

// { cuda: was CUDA compiled in, deviceCount, reason (why no device), devices: [{ name, computeCapability }] }
Napi::Value build_info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object out = Napi::Object::New(env);
  out.Set("cuda", has_cuda_backend());
  Napi::Array devices = Napi::Array::New(env);
  std::string why = "built without CUDA";
  int count = 0;
  if (has_cuda_backend()) {
    count = cuda_backend().device_count(&why);
    for (int i = 0; i < count; ++i) {
      const DeviceInfo d = cuda_backend().device_info(Device{DeviceType::Cuda, i});
      Napi::Object entry = Napi::Object::New(env);
      entry.Set("name", d.name);
      entry.Set("computeCapability", d.compute_capability);
      devices.Set(static_cast<uint32_t>(i), entry);
    }
  }
  out.Set("deviceCount", count);
  out.Set("reason", why);
  out.Set("devices", devices);
  return out;
}

CachingAllocator& allocator_arg(const Napi::Value& v) {
  const Device device = get_device(v, "device");
  return backend_for(device).allocator(device);
}

Napi::Value memory_stats(const Napi::CallbackInfo& info) {
  const MemoryStats s = allocator_arg(info[0]).stats();
  Napi::Object out = Napi::Object::New(info.Env());
  out.Set("inUse", static_cast<double>(s.in_use));
  out.Set("cached", static_cast<double>(s.cached));
  out.Set("peak", static_cast<double>(s.peak_in_use));
  out.Set("limit", static_cast<double>(s.limit));
  out.Set("allocations", static_cast<double>(s.allocations));
  out.Set("cacheHits", static_cast<double>(s.cache_hits));
  return out;
}

Napi::Value empty_cache(const Napi::CallbackInfo& info) {
  allocator_arg(info[0]).empty_cache();
  return info.Env().Undefined();
}

Napi::Value set_memory_limit(const Napi::CallbackInfo& info) {
  CachingAllocator& alloc = allocator_arg(info[0]);
  alloc.set_limit(static_cast<size_t>(get_int(info[1], "bytes", 0, INT64_MAX)));
  return info.Env().Undefined();
}

// synchronize(device) -> Promise<void>, settled once all work queued so far on the device is done.
Napi::Value synchronize(const Napi::CallbackInfo& info) {
  const Device device = get_device(info[0], "device");
  std::shared_ptr<PendingWork> work = backend_for(device).record(device);
  return settle_after(
      info.Env(), [work]() { if (work) work->wait(); },
      [](Napi::Env env) -> Napi::Value { return env.Undefined(); });
}

using TimedEventRef = std::shared_ptr<TimedEvent>;

// recordEvent(device) -> an opaque timing point after the work queued so far.
Napi::Value record_event(const Napi::CallbackInfo& info) {
  const Device device = get_device(info[0], "device");
  auto* event = new TimedEventRef(backend_for(device).record_timed(device));
  return Napi::External<TimedEventRef>::New(info.Env(), event, [](Napi::Env, TimedEventRef* e) { delete e; });
}

TimedEventRef get_event(const Napi::Value& v, const char* name) {
  KV_CHECK(v.IsExternal(), Dtype, "Expected a recorded event for ", name, " but received ", describe_value(v));
  return *v.As<Napi::External<TimedEventRef>>().Data();
}

// elapsedMs(start, end) -> Promise<number>, once the device has passed `end`.
Napi::Value elapsed_ms(const Napi::CallbackInfo& info) {
  TimedEventRef start = get_event(info[0], "start");
  TimedEventRef end = get_event(info[1], "end");
  auto ms = std::make_shared<double>(0);
  return settle_after(
      info.Env(), [start, end, ms]() { *ms = end->elapsed_ms_since(*start); },
      [ms](Napi::Env env) -> Napi::Value { return Napi::Number::New(env, *ms); });
}

Napi::Value busy_wait(const Napi::CallbackInfo& info) {
  const Device device = get_device(info[0], "device");
  const double ms = get_number(info[1], "ms");
  KV_CHECK(ms >= 0 && ms <= 60000, Range, "Expected 0 <= ms <= 60000 for ms but received ", ms);
  backend_for(device).busy_wait(device, ms);
  return info.Env().Undefined();
}

Napi::Value flush_cache(const Napi::CallbackInfo& info) {
  const Device device = get_device(info[0], "device");
  backend_for(device).flush_cache(device);
  return info.Env().Undefined();
}

}  // namespace

void export_runtime_functions(Napi::Env env, Napi::Object exports) {
  exports.Set("buildInfo", Napi::Function::New<guarded<build_info>>(env, "buildInfo"));
  exports.Set("memoryStats", Napi::Function::New<guarded<memory_stats>>(env, "memoryStats"));
  exports.Set("emptyCache", Napi::Function::New<guarded<empty_cache>>(env, "emptyCache"));
  exports.Set("setMemoryLimit", Napi::Function::New<guarded<set_memory_limit>>(env, "setMemoryLimit"));
  exports.Set("synchronize", Napi::Function::New<guarded<synchronize>>(env, "synchronize"));
  exports.Set("recordEvent", Napi::Function::New<guarded<record_event>>(env, "recordEvent"));
  exports.Set("elapsedMs", Napi::Function::New<guarded<elapsed_ms>>(env, "elapsedMs"));
  exports.Set("busyWait", Napi::Function::New<guarded<busy_wait>>(env, "busyWait"));
  exports.Set("flushCache", Napi::Function::New<guarded<flush_cache>>(env, "flushCache"));
}

}  // namespace kvflash::binding
