// Launchers for Quest: page metadata, page scores, top-k page selection (quest_params.h).
#pragma once
#include "../core/quest_params.h"
#include "context.h"

namespace kvflash::cuda {

void launch_quest_update_meta(const QuestMetaParams& p, cudaStream_t stream);
void launch_quest_scores(const QuestScoreParams& p, cudaStream_t stream);
void launch_topk_pages(const TopkPagesParams& p, cudaStream_t stream);

}  // namespace kvflash::cuda
