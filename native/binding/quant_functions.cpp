// Quantized KV-cache ops (native/core/quant_format.h has the formats and layouts): quantizePages,
// dequantizePages, quantizedPagedDecode, quantizedPagedPrefill. Every shape, dtype, device and index is
// checked here, on the host, before a kernel runs.
#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "../core/backend.h"
#include "../core/quant_format.h"
#include "args.h"
#include "attention_functions.h"
#include "exports.h"
#include "page_table.h"
#include "quest_functions.h"
#include "tensor_args.h"
#include "tensor_handle.h"

namespace kvflash::binding {
namespace {

void check_tensor(const Tensor& t, const char* name, DType dtype, const Shape& shape, const Device& device) {
  KV_CHECK(t.device() == device, Device, "Expected ", name, " on ", device.name(), " but received ", t.describe());
  KV_CHECK(t.dtype() == dtype, Dtype, "Expected ", name, " of dtype ", dtype_name(dtype), " but received ",
           t.describe());
  KV_CHECK(t.shape() == shape, Shape, "Expected ", name, " of shape ", shape_str(shape), " but received ",
           shape_str(t.shape()));
}

QuantFormat get_format(const Napi::Value& v) {
  const std::string name = get_string(v, "format");
  for (QuantFormat f : {QuantFormat::FP8E4M3, QuantFormat::INT8, QuantFormat::INT4, QuantFormat::INT2}) {
    if (name == quant_format_name(f)) return f;
  }
  fail(ErrorCode::Range, "Expected 'fp8e4m3', 'int8', 'int4' or 'int2' for format but received '", name, "'");
}

// A quantized layer from (format, groupSize, kCodes, vCodes, kScale, kMin, vScale, vMin) at
// info[first..first+7]; its tensors are kept alive in *keep for the call.
QuantizedPages get_quantized(const Napi::CallbackInfo& info, int first, std::vector<Tensor>* keep) {
  QuantizedPages q;
  q.format = get_format(info[first]);
  const bool fp8 = q.format == QuantFormat::FP8E4M3;
  q.group_size = static_cast<int>(get_int(info[first + 1], "groupSize", 1, 1 << 20));
  KV_CHECK(fp8 || q.group_size == 32 || q.group_size == 64 || q.group_size == 128, Range,
           "Expected 32, 64 or 128 for groupSize but received ", q.group_size);
  const Tensor& k_codes = get_tensor(info[first + 2], "kCodes", 4);
  const Device device = k_codes.device();
  KV_CHECK(k_codes.dtype() == DType::U8, Dtype, "Expected kCodes of dtype u8 but received ", k_codes.describe());
  const int64_t row_bytes = k_codes.size(3);
  const int bits = quant_bits(q.format);
  q.num_pages = static_cast<int>(k_codes.size(0));
  q.page_size = static_cast<int>(k_codes.size(1));
  q.num_kv_heads = static_cast<int>(k_codes.size(2));
  q.head_dim = static_cast<int>(row_bytes * 8 / bits);
  KV_CHECK(k_codes.size(0) <= INT32_MAX && k_codes.size(2) > 0 && row_bytes > 0, Shape,
           "Expected kCodes [numPages, P, Hkv, D*bits/8] with Hkv, D > 0 but received ", shape_str(k_codes.shape()));
  KV_CHECK(q.page_size >= 1 && q.page_size <= 256 && (q.page_size & (q.page_size - 1)) == 0, Range,
           "Expected a power of two from 1 to 256 for the page size (kCodes.shape[1]) but received ", q.page_size);
  KV_CHECK(fp8 || q.head_dim % q.group_size == 0, Shape, "Expected the head dim ", q.head_dim,
           " (kCodes.shape[3] * 8 / ", bits, ") to be a multiple of groupSize ", q.group_size);
  const Tensor& v_codes = get_tensor(info[first + 3], "vCodes", 4);
  check_tensor(v_codes, "vCodes", DType::U8, k_codes.shape(), device);
  const Tensor& k_scale = TensorHandle::unwrap(info[first + 4], "kScale");
  const Tensor& v_scale = TensorHandle::unwrap(info[first + 6], "vScale");
  const int64_t N = q.num_pages, P = q.page_size, H = q.num_kv_heads, D = q.head_dim;
  keep->insert(keep->end(), {k_codes, v_codes, k_scale, v_scale});
  if (fp8) {
    KV_CHECK(info[first + 5].IsUndefined() || info[first + 5].IsNull(), Shape,
             "Expected no kMin for format fp8e4m3 but received ", describe_value(info[first + 5]));
    KV_CHECK(info[first + 7].IsUndefined() || info[first + 7].IsNull(), Shape,
             "Expected no vMin for format fp8e4m3 but received ", describe_value(info[first + 7]));
    check_tensor(k_scale, "kScale", DType::F16, {N, H}, device);
    check_tensor(v_scale, "vScale", DType::F16, {N, H}, device);
  } else {
    const Tensor& k_min = TensorHandle::unwrap(info[first + 5], "kMin");
    const Tensor& v_min = TensorHandle::unwrap(info[first + 7], "vMin");
    check_tensor(k_scale, "kScale", DType::F16, {N, H, D}, device);
    check_tensor(k_min, "kMin", DType::F16, {N, H, D}, device);
    check_tensor(v_scale, "vScale", DType::F16, {N, P, H, D / q.group_size}, device);
    check_tensor(v_min, "vMin", DType::F16, {N, P, H, D / q.group_size}, device);
    keep->insert(keep->end(), {k_min, v_min});
    q.k_min = static_cast<uint16_t*>(k_min.data());
    q.v_min = static_cast<uint16_t*>(v_min.data());
  }
  q.k_codes = k_codes.data();
  q.v_codes = v_codes.data();
  q.k_scale = static_cast<uint16_t*>(k_scale.data());
  q.v_scale = static_cast<uint16_t*>(v_scale.data());
  if (device.is_cuda()) {
    KV_CHECK(q.head_dim == 64 || q.head_dim == 128 || q.head_dim == 256, Unsupported,
             "Expected head dim 64, 128 or 256 on a GPU but received ", q.head_dim);
  }
  return q;
}

void check_page_list(const HostInts& pages, int64_t limit, const char* name, const char* pool) {
  for (int64_t i = 0; i < pages.size; ++i) {
    KV_CHECK(pages[i] >= 0 && pages[i] < limit, Range, "Expected ", name, "[", i, "] in [0, ", limit, ") (the pages of ",
             pool, ") but received ", pages[i]);
  }
}

// quantizePages(kSrc, vSrc, srcPages, dstPages, format, groupSize, kCodes, vCodes, kScale, kMin, vScale, vMin,
//               questMeta?): questMeta also gets each destination page's Quest metadata, from its source keys.
Napi::Value quantize_pages(const Napi::CallbackInfo& info) {
  const Tensor& k_src = get_tensor(info[0], "kSrc", 4);
  const Tensor& v_src = get_tensor(info[1], "vSrc", 4);
  check_float_input(k_src, "kSrc");
  check_tensor(v_src, "vSrc", k_src.dtype(), k_src.shape(), k_src.device());
  const HostInts src_pages = get_ints(info[2], "srcPages");
  const HostInts dst_pages = get_ints(info[3], "dstPages");
  std::vector<Tensor> keep;
  QuantizeParams p;
  p.dst = get_quantized(info, 4, &keep);
  const Device device = k_src.device();
  KV_CHECK(keep[0].device() == device, Device, "Expected kCodes on ", device.name(), " like kSrc but received ",
           keep[0].describe());
  const Shape page_shape = {p.dst.page_size, p.dst.num_kv_heads, p.dst.head_dim};
  KV_CHECK(k_src.size(1) == page_shape[0] && k_src.size(2) == page_shape[1] && k_src.size(3) == page_shape[2], Shape,
           "Expected kSrc of shape [numSrc, ", page_shape[0], ", ", page_shape[1], ", ", page_shape[2],
           "] to match the quantized pages but received ", shape_str(k_src.shape()));
  KV_CHECK(src_pages.size == dst_pages.size, Shape, "Expected as many dstPages as srcPages (", src_pages.size,
           ") but received ", dst_pages.size);
  check_page_list(src_pages, k_src.size(0), "srcPages", "kSrc");
  check_page_list(dst_pages, p.dst.num_pages, "dstPages", "kCodes");
  // A page written twice would race on a GPU: (page, position) pairs sorted, so a repeat sits next to its first.
  std::vector<std::pair<int32_t, int64_t>> order(static_cast<size_t>(dst_pages.size));
  for (int64_t i = 0; i < dst_pages.size; ++i) order[static_cast<size_t>(i)] = {dst_pages[i], i};
  std::sort(order.begin(), order.end());
  for (size_t i = 1; i < order.size(); ++i) {
    KV_CHECK(order[i].first != order[i - 1].first, Range, "Expected distinct dstPages but dstPages[", order[i].second,
             "] = ", order[i].first, " repeats dstPages[", order[i - 1].second, "]");
  }
  p.dtype = k_src.dtype();
  p.count = static_cast<int>(src_pages.size);
  p.k_src = k_src.data();
  p.v_src = v_src.data();
  const Tensor src_dev = on_device(src_pages, device), dst_dev = on_device(dst_pages, device);
  p.src_pages = src_dev.data_as<int32_t>();
  p.dst_pages = dst_dev.data_as<int32_t>();
  p.src_pages_host = src_pages.data;
  p.dst_pages_host = dst_pages.data;
  const bool with_meta = !info[12].IsUndefined() && !info[12].IsNull();
  const Tensor* meta = with_meta ? &check_quantized_quest_meta(info[12], p.dst.num_pages, p.dst.num_kv_heads,
                                                                p.dst.head_dim, k_src.dtype(), device)
                                 : nullptr;
  if (p.count > 0) backend_for(device).quantize_pages(device, p);
  if (meta && p.count > 0) {
    update_quest_meta(k_src, *meta, std::vector<int32_t>(src_pages.data, src_pages.data + src_pages.size),
                      std::vector<int32_t>(static_cast<size_t>(src_pages.size), p.dst.page_size),
                      std::vector<int32_t>(dst_pages.data, dst_pages.data + dst_pages.size));
  }
  return info.Env().Undefined();
}

// dequantizePages(format, groupSize, kCodes, vCodes, kScale, kMin, vScale, vMin, pages, dtype) -> [k, v]
Napi::Value dequantize_pages(const Napi::CallbackInfo& info) {
  std::vector<Tensor> keep;
  DequantizeParams p;
  p.src = get_quantized(info, 0, &keep);
  const Device device = keep[0].device();
  const HostInts pages = get_ints(info[8], "pages");
  check_page_list(pages, p.src.num_pages, "pages", "kCodes");
  p.dtype = get_dtype(info[9], "dtype");
  const bool ok = p.dtype == DType::BF16 || p.dtype == DType::F16 || p.dtype == DType::F32;
  KV_CHECK(ok, Dtype, "Expected 'f32', 'bf16' or 'f16' for dtype but received '", dtype_name(p.dtype), "'");
  const Shape shape = {pages.size, p.src.page_size, p.src.num_kv_heads, p.src.head_dim};
  Tensor k_out = empty(shape, p.dtype, device), v_out = empty(shape, p.dtype, device);
  const Tensor pages_dev = on_device(pages, device);
  p.count = static_cast<int>(pages.size);
  p.pages = pages_dev.data_as<int32_t>();
  p.pages_host = pages.data;
  p.k_out = k_out.data();
  p.v_out = v_out.data();
  if (p.count > 0) backend_for(device).dequantize_pages(device, p);
  Napi::Array r = Napi::Array::New(info.Env(), 2);
  r.Set(0u, TensorHandle::wrap(info.Env(), k_out));
  r.Set(1u, TensorHandle::wrap(info.Env(), v_out));
  return r;
}

// Where a table's index first reaches `limit`: among the rows' inner pages (inner) or their last
// pages (!inner), from the host indices; entry -1 when they are not on the host.
struct EntryAt {
  int64_t entry = -1;
  int row = -1;
};
EntryAt entry_reaching(const StagedPageTable& table, bool inner, int32_t limit) {
  for (int r = 0; r < table.batch * table.rows_per_sequence && !table.indices.empty(); ++r) {
    const int32_t last = table.indptr[r + 1] - 1;
    for (int32_t i = inner ? table.indptr[r] : last; i < (inner ? last : last + 1); ++i) {
      if (table.indices[i] >= limit) return {i, r};
    }
  }
  return {};
}

// A quantized layer at info[first .. first+7], its full-precision tail pool kTail, vTail at info[first+8],
// info[first+9] and a staged table at info[first+10], checked against q and each other: every index but
// the last of a row names a quantized page, the last a tail page. Rows are sequences, or (sequence, KV
// head) pairs where `per_head_rows` allows (a topkPages selection). `op` names the op in messages.
struct QuantizedKV {
  std::vector<Tensor> keep;  // the layer's tensors, alive for the call
  QuantizedPages quant;
  AttentionShape shape;
  std::shared_ptr<const StagedPageTable> table;
  PagedKV kv;  // the table over the tail pool
};

QuantizedKV get_quantized_kv(const Napi::CallbackInfo& info, int first, const Tensor& q, const char* op,
                             bool per_head_rows) {
  QuantizedKV in;
  in.quant = get_quantized(info, first, &in.keep);
  const Device device = q.device();
  KV_CHECK(in.keep[0].device() == device, Device, "Expected kCodes on ", device.name(), " like q but received ",
           in.keep[0].describe());
  const Tensor& k_tail = get_tensor(info[first + 8], "kTail", 4);
  const Tensor& v_tail = get_tensor(info[first + 9], "vTail", 4);
  const int64_t P = in.quant.page_size, Hkv = in.quant.num_kv_heads, D = in.quant.head_dim;
  check_tensor(k_tail, "kTail", q.dtype(), {k_tail.size(0), P, Hkv, D}, device);
  check_tensor(v_tail, "vTail", q.dtype(), k_tail.shape(), device);
  in.shape.num_q_heads = static_cast<int>(q.size(1));
  in.shape.num_kv_heads = static_cast<int>(Hkv);
  in.shape.head_dim = static_cast<int>(q.size(2));
  KV_CHECK(q.size(2) == D, Shape, "Expected head dim ", D, " (from the quantized pages) for q but received ",
           shape_str(q.shape()));
  KV_CHECK(q.size(1) > 0 && q.size(1) % Hkv == 0, Shape, "Expected the ", Hkv,
           " KV heads to divide the query heads of q but received ", shape_str(q.shape()));
  in.table = PageTableHandle::unwrap(info[first + 10], "table");
  const StagedPageTable& table = *in.table;
  KV_CHECK(table.device == device, Device, "Expected a page table staged on ", device.name(),
           " but received one staged on ", table.device.name());
  if (per_head_rows) {
    KV_CHECK(table.rows_per_sequence == 1 || table.rows_per_sequence == Hkv, Shape,
             "Expected a table with one row per sequence or per KV head (", Hkv, ") for ", op, " but received ",
             table.rows_per_sequence, " rows per sequence");
  } else {
    KV_CHECK(table.rows_per_sequence == 1, Unsupported, "Expected a page table with one row per sequence for ", op,
             " but received one with ", table.rows_per_sequence, " rows per sequence");
  }
  const int64_t num_tail = k_tail.size(0);
  const auto indices_at = [&](const EntryAt& at) {
    return at.entry >= 0 ? "indices[" + std::to_string(at.entry) + "]" : std::string("indices");
  };
  if (table.max_inner_index >= in.quant.num_pages) {
    const EntryAt at = entry_reaching(table, true, static_cast<int32_t>(in.quant.num_pages));
    fail(ErrorCode::Range, "Expected ", indices_at(at), " in [0, ", in.quant.num_pages,
         ") (the quantized pages of kCodes) but received ", at.entry >= 0 ? table.indices[at.entry] : table.max_inner_index);
  }
  if (table.max_last_index >= num_tail) {
    const EntryAt at = entry_reaching(table, false, static_cast<int32_t>(num_tail));
    const std::string whose = at.entry < 0 ? "of a row's last page"
                              : table.rows_per_sequence == 1 ? "(the last page of sequence " + std::to_string(at.row) + ")"
                                                             : "(the last page of row " + std::to_string(at.row) + ")";
    fail(ErrorCode::Range, "Expected ", indices_at(at), " ", whose, " in [0, ", num_tail,
         ") (the full-precision pages of kTail) but received ", at.entry >= 0 ? table.indices[at.entry] : table.max_last_index);
  }
  table.check_last_page_len(P);
  in.kv = table.view();
  in.kv.k_pages = k_tail.data();
  in.kv.v_pages = v_tail.data();
  in.kv.num_pages = static_cast<int>(num_tail);
  in.kv.page_size = static_cast<int>(P);
  return in;
}

// quantizedPagedDecode(q, format, groupSize, kCodes, vCodes, kScale, kMin, vScale, vMin, kTail, vTail, table,
//                      scale, returnLse) -> [out, lse?]
Napi::Value quantized_paged_decode(const Napi::CallbackInfo& info) {
  const Tensor& q = get_tensor(info[0], "q", 3);
  check_float_input(q, "q");
  const QuantizedKV in = get_quantized_kv(info, 1, q, "quantizedPagedDecode", true);
  QuantDecodeParams p;
  p.dtype = q.dtype();
  p.shape = in.shape;
  p.quant = in.quant;
  p.kv = in.kv;
  p.scale = get_scale(info[12]);
  const QueryOutputs o = bind_decode_queries(p, q, *in.table, get_bool(info[13], "returnLse"));
  if (p.batch > 0) backend_for(q.device()).quantized_paged_decode(q.device(), p);
  return results(info.Env(), o.out, o.lse);
}

// quantizedPagedPrefill(q, format, groupSize, kCodes, vCodes, kScale, kMin, vScale, vMin, kTail, vTail, table,
//                       cuSeqlensQ, causal, windowLeft, scale, returnLse) -> [out, lse?]
Napi::Value quantized_paged_prefill(const Napi::CallbackInfo& info) {
  const Tensor& q = get_tensor(info[0], "q", 3);
  check_float_input(q, "q");
  const QuantizedKV in = get_quantized_kv(info, 1, q, "quantizedPagedPrefill", false);
  QuantPrefillParams p;
  p.dtype = q.dtype();
  p.shape = in.shape;
  p.quant = in.quant;
  p.kv = in.kv;
  p.mask = get_mask(info, 13);
  const HostInts cu_q = get_paged_queries(info[12], q, *in.table, p.kv.page_size, &p);
  const QueryOutputs o = bind_queries(p, q, cu_q, get_bool(info[16], "returnLse"));
  if (q.size(0) > 0) backend_for(q.device()).quantized_paged_prefill(q.device(), p);
  return results(info.Env(), o.out, o.lse);
}

}  // namespace

void export_quant_functions(Napi::Env env, Napi::Object exports) {
  exports.Set("quantizePages", Napi::Function::New<guarded<quantize_pages>>(env, "quantizePages"));
  exports.Set("dequantizePages", Napi::Function::New<guarded<dequantize_pages>>(env, "dequantizePages"));
  exports.Set("quantizedPagedDecode", Napi::Function::New<guarded<quantized_paged_decode>>(env, "quantizedPagedDecode"));
  exports.Set("quantizedPagedPrefill", Napi::Function::New<guarded<quantized_paged_prefill>>(env, "quantizedPagedPrefill"));
}

}  // namespace kvflash::binding
