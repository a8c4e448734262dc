#include "tensor_args.h"

#include "../core/backend.h"
#include "tensor_handle.h"

namespace kvflash::binding {

Tensor on_device(const HostInts& a, const Device& device) {
  const Tensor host(std::make_shared<Storage>(const_cast<int32_t*>(a.data), a.size * 4, Device{}, nullptr), 0,
                    DType::I32, {a.size});
  return device.is_cuda() ? to_device(host, device) : host;
}

const Tensor& get_tensor(const Napi::Value& v, const char* name, int rank) {
  const Tensor& t = TensorHandle::unwrap(v, name);
  KV_CHECK(t.dim() == rank, Shape, "Expected rank ", rank, " for ", name, " but received ", t.describe());
  return t;
}

void check_float_input(const Tensor& t, const char* name) {
  const bool gpu = t.device().is_cuda();
  const bool ok = t.dtype() == DType::BF16 || t.dtype() == DType::F16 || (!gpu && t.dtype() == DType::F32);
  KV_CHECK(ok, Dtype, "Expected ", gpu ? "bf16 or f16" : "bf16, f16 or f32", " for ", name, " but received ",
           t.describe());
}

void check_same(const Tensor& t, const Tensor& ref, const char* name, const char* ref_name) {
  KV_CHECK(t.device() == ref.device(), Device, "Expected ", name, " on ", ref.device().name(), " like ", ref_name,
           " but received ", t.describe());
  KV_CHECK(t.dtype() == ref.dtype(), Dtype, "Expected ", name, " of dtype ", dtype_name(ref.dtype()), " like ", ref_name,
           " but received ", t.describe());
}

}  // namespace kvflash::binding
