/** The typed op wrappers, as `kvflash.ops`. */
export { appendPagedKV, attentionMass, pagedDecodeAttention, pagedPrefillAttention, prefillAttention } from './attention';
export { StagedPageTable } from './page-table';
export { buildQuestMeta, createQuestMeta, questDecodeAttention, questScores, topkPages } from './quest';
export { createQuantizedPages, dequantizePages, disposeQuantizedPages, quantBits, quantizePages, quantizedPagedDecodeAttention, quantizedPagedPrefillAttention } from './quant';
