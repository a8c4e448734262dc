// Each file of the binding exports its own group of functions; addon.cpp calls them all.
#pragma once
#include <napi.h>

namespace kvflash::binding {

void export_tensor_functions(Napi::Env env, Napi::Object exports);
void export_runtime_functions(Napi::Env env, Napi::Object exports);
void export_attention_functions(Napi::Env env, Napi::Object exports);
void export_quest_functions(Napi::Env env, Napi::Object exports);
void export_quant_functions(Napi::Env env, Napi::Object exports);
void export_graph_functions(Napi::Env env, Napi::Object exports);

}  // namespace kvflash::binding
