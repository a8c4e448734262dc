// Quest references: metadata, scores and top-k page selection, written as the definitions read.
#pragma once
#include "../core/quest_params.h"

namespace kvflash::cpu {

void quest_update_meta(const QuestMetaParams& p);
void quest_scores(const QuestScoreParams& p);
void topk_pages(const TopkPagesParams& p);

}  // namespace kvflash::cpu
