// CUDA graphs: the work ops queue on a device between captureBegin and captureEnd becomes a graph
// that replays it, with the same buffers, for a fraction of the launch cost.
#include <memory>

#include "../core/backend.h"
#include "args.h"
#include "exports.h"

namespace kvflash::binding {
namespace {

using GraphRef = std::unique_ptr<CapturedGraph>;

// captureBegin(device)
Napi::Value capture_begin(const Napi::CallbackInfo& info) {
  const Device device = get_device(info[0], "device");
  backend_for(device).begin_graph_capture(device);
  return info.Env().Undefined();
}

// captureEnd(device) -> an opaque graph (freed by graphDispose, or by the garbage collector)
Napi::Value capture_end(const Napi::CallbackInfo& info) {
  const Device device = get_device(info[0], "device");
  auto* graph = new GraphRef(backend_for(device).end_graph_capture(device));
  return Napi::External<GraphRef>::New(info.Env(), graph, [](Napi::Env, GraphRef* g) { delete g; });
}

GraphRef& graph_arg(const Napi::Value& v) {
  KV_CHECK(v.IsExternal(), Dtype, "Expected a captured graph for graph but received ", describe_value(v));
  GraphRef& graph = *v.As<Napi::External<GraphRef>>().Data();
  KV_CHECK(graph != nullptr, Disposed, "Expected a live CudaGraph but received a disposed one");
  return graph;
}

// graphReplay(graph): queues the captured work again.
Napi::Value graph_replay(const Napi::CallbackInfo& info) {
  graph_arg(info[0])->replay();
  return info.Env().Undefined();
}

// graphDispose(graph): frees the graph and returns the memory it owns to its device's cache.
Napi::Value graph_dispose(const Napi::CallbackInfo& info) {
  graph_arg(info[0]).reset();
  return info.Env().Undefined();
}

}  // namespace

void export_graph_functions(Napi::Env env, Napi::Object exports) {
  exports.Set("captureBegin", Napi::Function::New<guarded<capture_begin>>(env, "captureBegin"));
  exports.Set("captureEnd", Napi::Function::New<guarded<capture_end>>(env, "captureEnd"));
  exports.Set("graphReplay", Napi::Function::New<guarded<graph_replay>>(env, "graphReplay"));
  exports.Set("graphDispose", Napi::Function::New<guarded<graph_dispose>>(env, "graphDispose"));
}

}  // namespace kvflash::binding
