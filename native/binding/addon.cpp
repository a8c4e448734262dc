// The module's entry point: the TensorHandle class and every group of functions.
#include <napi.h>

#include "exports.h"
#include "page_table.h"
#include "tensor_handle.h"

namespace {

Napi::Object init(Napi::Env env, Napi::Object exports) {
  kvflash::binding::TensorHandle::define(env, exports);
  kvflash::binding::PageTableHandle::define(env, exports);
  kvflash::binding::export_tensor_functions(env, exports);
  kvflash::binding::export_runtime_functions(env, exports);
  kvflash::binding::export_attention_functions(env, exports);
  kvflash::binding::export_quest_functions(env, exports);
  kvflash::binding::export_quant_functions(env, exports);
  kvflash::binding::export_graph_functions(env, exports);
  return exports;
}

}  // namespace

NODE_API_MODULE(kvflash, init)
