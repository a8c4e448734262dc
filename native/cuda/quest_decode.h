// Launcher for the fused Quest decode (quest_params.h: QuestDecodeParams): page bounds, the
// per-KV-head top-k and the sparse decode in one kernel.
#pragma once
#include <cstddef>

#include "../core/quest_params.h"
#include "context.h"

namespace kvflash::cuda {

// Whether the fused kernel covers p: GQA groups up to 16, sequences up to 8193 pages, and what one
// block of the chosen split holds. Else the backend runs questScores, topkPages and the paged decode.
bool quest_decode_fused(const QuestDecodeParams& p);

// Bytes of scratch the fused kernel needs (256-byte aligned); host-known values only.
size_t quest_decode_workspace_bytes(const QuestDecodeParams& p);

// Counters the fused kernel needs: zero before its first launch, and it leaves them zero.
size_t quest_decode_counters(const QuestDecodeParams& p);

void launch_quest_decode(const QuestDecodeParams& p, void* workspace, unsigned* counters, cudaStream_t stream);

}  // namespace kvflash::cuda
