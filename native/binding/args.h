// Reading JS arguments with the checks every op needs. Each failure is a kvflash::Error whose
// message names the argument, what was expected and what came, in the style of sharp:
// "Expected positive integer for pageSize but received -1 of type number".
#pragma once
#include <napi.h>

#include <string>

#include "../core/tensor.h"

namespace kvflash::binding {

// "-1 of type number", "'abc' of type string", "undefined": the "received" half of a message.
std::string describe_value(const Napi::Value& v);

int64_t get_int(const Napi::Value& v, const char* name, int64_t min_value, int64_t max_value);
double get_number(const Napi::Value& v, const char* name);
bool get_bool(const Napi::Value& v, const char* name);
std::string get_string(const Napi::Value& v, const char* name);
DType get_dtype(const Napi::Value& v, const char* name);
Device get_device(const Napi::Value& v, const char* name);
// A shape: an array of non-negative integers.
Shape get_shape(const Napi::Value& v, const char* name);

// A borrowed view of a JS Int32Array, valid during the call.
struct HostInts {
  const int32_t* data = nullptr;
  int64_t size = 0;
  int32_t operator[](int64_t i) const { return data[i]; }
};
HostInts get_ints(const Napi::Value& v, const char* name);

// Offsets [B+1]: from 0, never decreasing, ending at `total` (the rows that `rows_of` has).
// Returns B and sets *max_len to the largest difference.
int check_offsets(const HostInts& a, int64_t total, const char* name, const char* rows_of, int* max_len);

// Runs an exported function, turning kvflash::Error into a JS Error with `code` set.
template <Napi::Value (*F)(const Napi::CallbackInfo&)>
Napi::Value guarded(const Napi::CallbackInfo& info);

void throw_js(Napi::Env env, const char* code, const std::string& message);

template <Napi::Value (*F)(const Napi::CallbackInfo&)>
Napi::Value guarded(const Napi::CallbackInfo& info) {
  try {
    return F(info);
  } catch (const Error& e) {
    throw_js(info.Env(), error_code_name(e.code()), e.what());
  } catch (const std::bad_alloc&) {
    throw_js(info.Env(), "E_OOM", "Out of host memory");
  }
  return info.Env().Undefined();
}

}  // namespace kvflash::binding
