#include "tensor_handle.h"

#include "addon_data.h"
#include "args.h"

namespace kvflash::binding {

void TensorHandle::define(Napi::Env env, Napi::Object exports) {
  Napi::Function ctor = DefineClass(env, "TensorHandle",
                                    {InstanceMethod<&TensorHandle::dispose>("dispose"),
                                     InstanceMethod<&TensorHandle::is_disposed>("isDisposed")});
  addon_data(env).tensor_constructor = Napi::Persistent(ctor);
  exports.Set("TensorHandle", ctor);
}

Napi::Object TensorHandle::wrap(Napi::Env env, Tensor tensor) {
  Napi::Object obj = addon_data(env).tensor_constructor.New({});
  Unwrap(obj)->tensor_ = std::move(tensor);
  return obj;
}

const Tensor& TensorHandle::unwrap_unready(const Napi::Value& v, const char* name) {
  const Napi::Env env = v.Env();
  const bool is_handle = v.IsObject() && v.As<Napi::Object>().InstanceOf(addon_data(env).tensor_constructor.Value());
  KV_CHECK(is_handle, Dtype, "Expected Tensor for ", name, " but received ", describe_value(v));
  const Tensor& t = Unwrap(v.As<Napi::Object>())->tensor_;
  KV_CHECK(t.defined(), Disposed, "Expected a live Tensor for ", name, " but received a disposed one");
  return t;
}

const Tensor& TensorHandle::unwrap(const Napi::Value& v, const char* name) {
  const Tensor& t = unwrap_unready(v, name);
  if (!t.device().is_cuda()) t.wait_host_ready();
  return t;
}

TensorHandle::TensorHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<TensorHandle>(info) {}

Napi::Value TensorHandle::dispose(const Napi::CallbackInfo& info) {
  tensor_ = Tensor();
  return info.Env().Undefined();
}

Napi::Value TensorHandle::is_disposed(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), !tensor_.defined());
}

}  // namespace kvflash::binding
