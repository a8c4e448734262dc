// The Hopper prefill path (prefill_sm90.cu), chosen by launch_prefill.
#pragma once
#include "../core/attention_params.h"
#include "context.h"

namespace kvflash::cuda {

// True when this build holds the sm_90a kernel, the current device is compute capability 9.0, and
// `p` is a shape it covers (head dim 128, bf16/f16, 16-byte aligned tensors).
bool prefill_sm90_fits(const PrefillParams& p);
void launch_prefill_sm90(const PrefillParams& p, cudaStream_t stream);

}  // namespace kvflash::cuda
