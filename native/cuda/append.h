// Launcher that writes new tokens' K and V into their sequences' pages.
#pragma once
#include "../core/attention_params.h"
#include "context.h"

namespace kvflash::cuda {

void launch_append_paged_kv(const AppendParams& p, cudaStream_t stream);

}  // namespace kvflash::cuda
