// Launcher for the attention-mass op (AttentionMassParams in attention_params.h).
#pragma once
#include "../core/attention_params.h"
#include "context.h"

namespace kvflash::cuda {

void launch_attention_mass(const AttentionMassParams& p, cudaStream_t stream);

}  // namespace kvflash::cuda
