// Checks on the tensor arguments of ops, shared by every op family's binding.
#pragma once
#include <napi.h>

#include "../core/tensor.h"
#include "args.h"

namespace kvflash::binding {

// An index array on the op's device: the host copy itself on the CPU (ops there finish within the
// call), an upload on a GPU.
Tensor on_device(const HostInts& a, const Device& device);
// A tensor argument of the given rank.
const Tensor& get_tensor(const Napi::Value& v, const char* name, int rank);
// bf16 or f16 (and f32 on the CPU reference): the dtypes the attention kernels take.
void check_float_input(const Tensor& t, const char* name);
// Same device and dtype as `ref`.
void check_same(const Tensor& t, const Tensor& ref, const char* name, const char* ref_name);

}  // namespace kvflash::binding
