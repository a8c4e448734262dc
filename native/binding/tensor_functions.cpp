// Creating, converting, moving and reading tensors.
#include <cstring>
#include <vector>

#include "../core/backend.h"
#include "../core/element_access.h"
#include "args.h"
#include "exports.h"
#include "pending_promise.h"
#include "tensor_handle.h"

namespace kvflash::binding {
namespace {

Napi::Value empty_tensor(const Napi::CallbackInfo& info) {
  const Shape shape = get_shape(info[0], "shape");
  const DType dtype = get_dtype(info[1], "dtype");
  const Device device = get_device(info[2], "device");
  return TensorHandle::wrap(info.Env(), empty(shape, dtype, device));
}

// fromHost(typedArray, sourceDtype, shape, dtype, device): the JS buffer is read during this call only.
Napi::Value from_host(const Napi::CallbackInfo& info) {
  KV_CHECK(info[0].IsTypedArray(), Dtype, "Expected a TypedArray for data but received ", describe_value(info[0]));
  const Napi::TypedArray data = info[0].As<Napi::TypedArray>();
  const DType source = get_dtype(info[1], "source dtype");
  const Shape shape = get_shape(info[2], "shape");
  const DType dtype = get_dtype(info[3], "dtype");
  const Device device = get_device(info[4], "device");
  const size_t expected = static_cast<size_t>(Tensor::numel_of(shape)) * dtype_size(source);
  KV_CHECK(data.ByteLength() == expected, Shape, "Expected data of ", expected / dtype_size(source),
           " elements for shape ", shape_str(shape), " but received ", data.ByteLength() / dtype_size(source));
  void* bytes = static_cast<char*>(data.ArrayBuffer().Data()) + data.ByteOffset();
  const Tensor borrowed(std::make_shared<Storage>(bytes, expected, Device{}, nullptr), 0, source, shape);
  Tensor host = borrowed;
  if (source != dtype) {
    host = empty(shape, dtype, Device{});
    cpu_backend().cast(borrowed, host);
  }
  // to_device always copies, so the result never points into the JS buffer.
  return TensorHandle::wrap(info.Env(), to_device(host, device));
}

Napi::Value fill(const Napi::CallbackInfo& info) {
  Tensor t = TensorHandle::unwrap(info[0], "tensor");
  backend_for(t.device()).fill(t, get_number(info[1], "value"));
  return info.Env().Undefined();
}

Napi::Value cast(const Napi::CallbackInfo& info) {
  const Tensor& src = TensorHandle::unwrap(info[0], "tensor");
  Tensor dst = empty(src.shape(), get_dtype(info[1], "dtype"), src.device());
  backend_for(src.device()).cast(src, dst);
  return TensorHandle::wrap(info.Env(), dst);
}

Napi::Value to(const Napi::CallbackInfo& info) {
  const Tensor& src = TensorHandle::unwrap(info[0], "tensor");
  return TensorHandle::wrap(info.Env(), to_device(src, get_device(info[1], "device")));
}

Napi::Value copy_into(const Napi::CallbackInfo& info) {
  const Tensor& src = TensorHandle::unwrap(info[0], "source");
  Tensor dst = TensorHandle::unwrap(info[1], "target");
  KV_CHECK(src.dtype() == dst.dtype() && src.shape() == dst.shape(), Shape, "Expected target ", dst.describe(),
           " to match source ", src.describe(), " in dtype and shape");
  Backend& backend = src.device().is_cuda() || dst.device().is_cuda() ? cuda_backend() : cpu_backend();
  backend.copy(src, dst);
  return info.Env().Undefined();
}

Napi::Value slice(const Napi::CallbackInfo& info) {
  const Tensor& t = TensorHandle::unwrap(info[0], "tensor");
  const int64_t start = get_int(info[1], "start", 0, INT64_MAX);
  const int64_t end = get_int(info[2], "end", 0, INT64_MAX);
  return TensorHandle::wrap(info.Env(), t.slice0(start, end));
}

Napi::Value reshape(const Napi::CallbackInfo& info) {
  const Tensor& t = TensorHandle::unwrap(info[0], "tensor");
  return TensorHandle::wrap(info.Env(), t.reshape(get_shape(info[1], "shape")));
}

Napi::Value reinterpret(const Napi::CallbackInfo& info) {
  const Tensor& t = TensorHandle::unwrap(info[0], "tensor");
  return TensorHandle::wrap(info.Env(), t.reinterpret(get_dtype(info[1], "dtype"), get_shape(info[2], "shape")));
}

// read(tensor, asFloat) -> Promise<ArrayBuffer>: a snapshot taken in stream order now, converted to
// float32 (float dtypes, when asFloat) or returned as raw bytes, once the device has delivered it.
Napi::Value read(const Napi::CallbackInfo& info) {
  const Tensor& t = TensorHandle::unwrap_unready(info[0], "tensor");
  const bool as_float = get_bool(info[1], "asFloat") && is_float(t.dtype()) && t.dtype() != DType::F32;
  // A host tensor a download is still filling is read as it lands (its final contents); anything
  // else is snapshotted now, in stream order.
  const bool landing = !t.device().is_cuda() && t.storage()->pending_fill;
  const Tensor snapshot = landing ? t : to_device(t, Device{});
  const std::shared_ptr<PendingWork> pending = snapshot.storage()->pending_fill;
  auto out = std::make_shared<std::vector<char>>();
  auto wait = [snapshot, pending, as_float, out]() {
    if (pending) pending->wait();
    if (as_float) {
      out->resize(static_cast<size_t>(snapshot.numel()) * 4);
      for (int64_t i = 0; i < snapshot.numel(); ++i)
        store_float(DType::F32, out->data(), i, load_float(snapshot.dtype(), snapshot.data(), i));
    } else {
      out->assign(static_cast<const char*>(snapshot.data()), static_cast<const char*>(snapshot.data()) + snapshot.nbytes());
    }
  };
  auto finish = [out](Napi::Env env) -> Napi::Value {
    Napi::ArrayBuffer buffer = Napi::ArrayBuffer::New(env, out->size());
    if (!out->empty()) std::memcpy(buffer.Data(), out->data(), out->size());
    return buffer;
  };
  return settle_after(info.Env(), wait, finish);
}

}  // namespace

void export_tensor_functions(Napi::Env env, Napi::Object exports) {
  exports.Set("empty", Napi::Function::New<guarded<empty_tensor>>(env, "empty"));
  exports.Set("fromHost", Napi::Function::New<guarded<from_host>>(env, "fromHost"));
  exports.Set("fill", Napi::Function::New<guarded<fill>>(env, "fill"));
  exports.Set("cast", Napi::Function::New<guarded<cast>>(env, "cast"));
  exports.Set("to", Napi::Function::New<guarded<to>>(env, "to"));
  exports.Set("copyInto", Napi::Function::New<guarded<copy_into>>(env, "copyInto"));
  exports.Set("slice", Napi::Function::New<guarded<slice>>(env, "slice"));
  exports.Set("reshape", Napi::Function::New<guarded<reshape>>(env, "reshape"));
  exports.Set("reinterpret", Napi::Function::New<guarded<reinterpret>>(env, "reinterpret"));
  exports.Set("read", Napi::Function::New<guarded<read>>(env, "read"));
}

}  // namespace kvflash::binding
