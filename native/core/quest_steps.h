// Quest's decode step as its three ops, for any backend: the scores, the top-k into a per-KV-head
// table, and the paged decode over it. The CPU backend's quest_decode is exactly this (the
// definition); the CUDA backend runs it where its fused kernel does not reach.
#pragma once
#include "backend.h"

namespace kvflash {

void quest_decode_in_steps(Backend& backend, const Device& device, const QuestDecodeParams& p);

}  // namespace kvflash
