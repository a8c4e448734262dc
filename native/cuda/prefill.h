// Launchers for prefill attention (many queries per sequence) over ragged or paged K/V.
#pragma once
#include "../core/attention_params.h"
#include "context.h"

namespace kvflash::cuda {

// q, k, v ragged by cu_seqlens_q / cu_seqlens_k.
void launch_prefill(const PrefillParams& p, cudaStream_t stream);
// q ragged by cu_seqlens_q; K/V read through the page table.
void launch_paged_prefill(const PagedPrefillParams& p, cudaStream_t stream);

}  // namespace kvflash::cuda
