// The JS-visible handle of a native Tensor. lib/tensor.ts wraps it; every op takes handles.
// dispose() drops the storage at once; the garbage collector's finalizer is only a safety net.
#pragma once
#include <napi.h>

#include "../core/tensor.h"

namespace kvflash::binding {

class TensorHandle : public Napi::ObjectWrap<TensorHandle> {
 public:
  static void define(Napi::Env env, Napi::Object exports);
  // A new handle owning `tensor`.
  static Napi::Object wrap(Napi::Env env, Tensor tensor);
  // The tensor behind a handle argument; E_DISPOSED after dispose(), E_DTYPE for a non-handle.
  // A host tensor that a device download is still filling is waited for first, so every op reads
  // finished data (toArray avoids that wait: it reads through unwrap_unready and a worker).
  static const Tensor& unwrap(const Napi::Value& v, const char* name);
  static const Tensor& unwrap_unready(const Napi::Value& v, const char* name);

  explicit TensorHandle(const Napi::CallbackInfo& info);

 private:
  Napi::Value dispose(const Napi::CallbackInfo& info);
  Napi::Value is_disposed(const Napi::CallbackInfo& info);

  Tensor tensor_;
};

}  // namespace kvflash::binding
