// Launchers for paged decode attention: one query token per sequence over its whole paged K/V.
#pragma once
#include <cstddef>

#include "../core/attention_params.h"
#include "context.h"

namespace kvflash::cuda {

// Bytes of float32 scratch the decode needs for its split-K partial results (0 if it never splits).
// Depends only on host-known values (batch, heads, head_dim, max_pages_per_seq, page_size) and the
// device, so a buffer sized once serves every launch with the same capacities (CUDA graphs).
size_t paged_decode_workspace_bytes(const DecodeParams& p);

// `workspace` holds at least paged_decode_workspace_bytes(p) bytes (may be null when that is 0).
void launch_paged_decode(const DecodeParams& p, void* workspace, cudaStream_t stream);

}  // namespace kvflash::cuda
