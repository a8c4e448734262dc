// What the other op families' bindings share with the attention ops (quant_functions.cpp's quantized
// prefill and decode): the mask options, the query side of a paged prefill, and the [out, lse] result.
#pragma once
#include <napi.h>

#include "../core/attention_params.h"
#include "../core/backend.h"
#include "args.h"
#include "page_table.h"
#include "tensor_args.h"

namespace kvflash::binding {

// The softmax scale of an attention op: a positive finite number.
float get_scale(const Napi::Value& v);

// causal, windowLeft, scale at info[first_arg ..]: windowLeft >= -1, scale positive and finite.
AttentionMask get_mask(const Napi::CallbackInfo& info, int first_arg);

// A paged prefill's cuSeqlensQ (B+1 entries, B from the dense table, ending at q's rows), with no more
// queries than keys in a sequence under a causal mask. Sets batch, max_seqlen_q and max_seqlen_k of
// *p, whose mask must be set; the table's lengths count page_size tokens a page.
HostInts get_paged_queries(const Napi::Value& v, const Tensor& q, const StagedPageTable& table, int page_size,
                           PagedPrefillParams* p);

Tensor lse_tensor(bool wanted, int64_t rows, int heads, const Device& device);

// [out, lse or undefined]
Napi::Value results(Napi::Env env, const Tensor& out, const Tensor& lse);

// The query side both prefills share: the output (and lse) tensors, cuSeqlensQ on the device, and the
// params fields pointing at them; the tensors live as long as the returned struct (cu_q_dev stays
// empty for the decodes).
struct QueryOutputs {
  Tensor out, lse, cu_q_dev;
};

template <typename Params>
QueryOutputs bind_queries(Params& p, const Tensor& q, const HostInts& cu_q, bool return_lse) {
  QueryOutputs o;
  o.out = empty(q.shape(), q.dtype(), q.device());
  o.lse = lse_tensor(return_lse, q.size(0), p.shape.num_q_heads, q.device());
  o.cu_q_dev = on_device(cu_q, q.device());
  p.total_q = static_cast<int>(q.size(0));
  p.q = q.data();
  p.out = o.out.data();
  p.lse = o.lse.defined() ? o.lse.data_as<float>() : nullptr;
  p.cu_seqlens_q = o.cu_q_dev.data_as<int32_t>();
  p.cu_seqlens_q_host = cu_q.data;
  return o;
}

// The query side the decodes share (one query row per sequence of the table, checked): the output
// (and lse) tensors and the params fields pointing at them, batch and max_pages_per_seq from the table.
template <typename Params>
QueryOutputs bind_decode_queries(Params& p, const Tensor& q, const StagedPageTable& table, bool return_lse) {
  table.check_query_rows(q);
  QueryOutputs o;
  o.out = empty(q.shape(), q.dtype(), q.device());
  o.lse = lse_tensor(return_lse, q.size(0), p.shape.num_q_heads, q.device());
  p.batch = table.batch;
  p.max_pages_per_seq = table.max_pages;
  p.q = q.data();
  p.out = o.out.data();
  p.lse = o.lse.defined() ? o.lse.data_as<float>() : nullptr;
  return o;
}

}  // namespace kvflash::binding
