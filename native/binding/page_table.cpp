#include "page_table.h"

#include <algorithm>
#include <cstring>

#include "../core/backend.h"
#include "addon_data.h"
#include "args.h"
#include "exports.h"
#include "tensor_handle.h"

namespace kvflash::binding {

Tensor PageTableHandle::upload(const std::vector<int32_t>& values, const Device& device) {
  Tensor t = empty({static_cast<int64_t>(values.size())}, DType::I32, device);
  const Tensor host(std::make_shared<Storage>(const_cast<int32_t*>(values.data()), values.size() * 4, Device{}, nullptr),
                    0, DType::I32, {static_cast<int64_t>(values.size())});
  backend_for(device).copy(host, t);
  return t;
}

void StagedPageTable::check_query_rows(const Tensor& q) const {
  KV_CHECK(q.size(0) == batch, Shape, "Expected ", batch, " rows (one per sequence of the page table) for q but received ",
           q.size(0));
}

void StagedPageTable::check_last_page_len(int64_t page_size) const {
  if (max_last_page_len <= page_size) return;
  const auto it = std::find_if(last_page_len.begin(), last_page_len.end(), [&](int32_t l) { return l > page_size; });
  fail(ErrorCode::Range, "Expected lastPageLen[", it - last_page_len.begin(), "] in [1, ", page_size,
       "] but received ", *it);
}

PagedKV StagedPageTable::bind(const void* k_pages, const void* v_pages, int64_t num_pages, int64_t page_size) const {
  if (max_index >= num_pages) {
    const auto it = std::find_if(indices.begin(), indices.end(), [&](int32_t i) { return i >= num_pages; });
    KV_CHECK(it == indices.end(), Range, "Expected indices[", it - indices.begin(), "] in [0, ", num_pages,
             ") (the pages of kPages) but received ", *it);
    fail(ErrorCode::Range, "Expected page indices in [0, ", num_pages, ") (the pages of kPages) but the table reaches ",
         max_index);
  }
  check_last_page_len(page_size);
  PagedKV kv = view();
  kv.k_pages = k_pages;
  kv.v_pages = v_pages;
  kv.num_pages = static_cast<int>(num_pages);
  kv.page_size = static_cast<int>(page_size);
  return kv;
}

PagedKV StagedPageTable::view() const {
  PagedKV kv;
  kv.indptr = indptr_dev.data_as<int32_t>();
  kv.indices = indices_dev.data_as<int32_t>();
  kv.last_page_len = last_page_len_dev.data_as<int32_t>();
  kv.indptr_host = indptr.data();
  kv.indices_host = indices.empty() ? nullptr : indices.data();
  kv.rows_per_sequence = rows_per_sequence;
  kv.last_page_len_host = last_page_len.data();
  return kv;
}

Napi::Value PageTableHandle::stage(const Napi::CallbackInfo& info) {
  const HostInts indptr = get_ints(info[0], "indptr");
  const HostInts indices = get_ints(info[1], "indices");
  const HostInts last = get_ints(info[2], "lastPageLen");
  auto table = std::make_shared<StagedPageTable>();
  table->device = get_device(info[3], "device");
  table->batch = check_offsets(indptr, indices.size, "indptr", "indices", &table->max_pages);
  KV_CHECK(last.size == table->batch, Shape, "Expected ", table->batch,
           " entries (one per sequence) for lastPageLen but received ", last.size);
  for (int b = 0; b < table->batch; ++b) {
    KV_CHECK(indptr[b + 1] > indptr[b], Range, "Expected at least one page for sequence ", b, " but indptr gives none");
    KV_CHECK(last[b] >= 1, Range, "Expected lastPageLen[", b, "] >= 1 but received ", last[b]);
    table->max_last_page_len = std::max(table->max_last_page_len, last[b]);
  }
  // indptr runs from 0 to indices.size without decreasing: this visits every index once, in order.
  for (int b = 0; b < table->batch; ++b) {
    for (int64_t i = indptr[b]; i < indptr[b + 1]; ++i) {
      KV_CHECK(indices[i] >= 0, Range, "Expected indices[", i, "] >= 0 but received ", indices[i]);
      int32_t& most = i + 1 < indptr[b + 1] ? table->max_inner_index : table->max_last_index;
      most = std::max(most, indices[i]);
    }
  }
  table->max_index = std::max(table->max_inner_index, table->max_last_index);
  table->indptr.assign(indptr.data, indptr.data + indptr.size);
  table->indices.assign(indices.data, indices.data + indices.size);
  table->last_page_len.assign(last.data, last.data + last.size);
  table->indptr_dev = upload(table->indptr, table->device);
  table->indices_dev = upload(table->indices, table->device);
  table->last_page_len_dev = upload(table->last_page_len, table->device);
  return wrap(info.Env(), std::move(table));
}

Napi::Object PageTableHandle::wrap(Napi::Env env, std::shared_ptr<const StagedPageTable> table) {
  Napi::Object handle = addon_data(env).page_table_constructor.New({});
  handle.Set("batch", table->batch);
  handle.Set("maxPages", table->max_pages);
  handle.Set("rowsPerSequence", table->rows_per_sequence);
  handle.Set("entries", static_cast<double>(table->indptr.back()));
  Unwrap(handle)->table_ = std::move(table);
  return handle;
}

namespace {

// pageTableArrays(table) -> [indptr, indices, lastPageLen] as i32 tensors on the table's device,
// sharing its memory.
Napi::Value page_table_arrays(const Napi::CallbackInfo& info) {
  const auto table = PageTableHandle::unwrap(info[0], "table");
  Napi::Array out = Napi::Array::New(info.Env(), 3);
  out.Set(0u, TensorHandle::wrap(info.Env(), table->indptr_dev));
  out.Set(1u, TensorHandle::wrap(info.Env(), table->indices_dev));
  out.Set(2u, TensorHandle::wrap(info.Env(), table->last_page_len_dev));
  return out;
}

// copySegments(src, starts, dst, offsets): dst[offsets[i], offsets[i+1]) = the entries of src from
// starts[i] on, for every segment i. The cache gathers the page lists of a table's rows with it: one
// call instead of a TypedArray.set per row, which costs V8 ~12 ns however short the row.
Napi::Value copy_segments(const Napi::CallbackInfo& info) {
  const HostInts src = get_ints(info[0], "src");
  const HostInts starts = get_ints(info[1], "starts");
  const HostInts dst = get_ints(info[2], "dst");
  const HostInts offsets = get_ints(info[3], "offsets");
  int longest = 0;
  const int segments = check_offsets(offsets, dst.size, "offsets", "dst", &longest);
  KV_CHECK(starts.size == segments, Shape, "Expected ", segments, " entries (one per segment) for starts but received ",
           starts.size);
  for (int i = 0; i < segments; ++i) {
    const int64_t length = offsets[i + 1] - offsets[i];
    KV_CHECK(starts[i] >= 0 && starts[i] + length <= src.size, Range, "Expected starts[", i, "] in [0, ",
             src.size - length, "] (segment ", i, " holds ", length, " entries of src's ", src.size, ") but received ",
             starts[i]);
  }
  int32_t* out = info[2].As<Napi::Int32Array>().Data();
  for (int i = 0; i < segments; ++i) {
    // memmove: src and dst may be views of one buffer.
    std::memmove(out + offsets[i], src.data + starts[i], sizeof(int32_t) * static_cast<size_t>(offsets[i + 1] - offsets[i]));
  }
  return info.Env().Undefined();
}

}  // namespace

void PageTableHandle::define(Napi::Env env, Napi::Object exports) {
  Napi::Function ctor = DefineClass(env, "PageTableHandle", {InstanceMethod<&PageTableHandle::dispose>("dispose")});
  addon_data(env).page_table_constructor = Napi::Persistent(ctor);
  exports.Set("PageTableHandle", ctor);
  exports.Set("stagePageTable", Napi::Function::New<guarded<&PageTableHandle::stage>>(env, "stagePageTable"));
  exports.Set("pageTableArrays", Napi::Function::New<guarded<page_table_arrays>>(env, "pageTableArrays"));
  exports.Set("copySegments", Napi::Function::New<guarded<copy_segments>>(env, "copySegments"));
}

std::shared_ptr<const StagedPageTable> PageTableHandle::unwrap(const Napi::Value& v, const char* name) {
  const bool is_handle =
      v.IsObject() && v.As<Napi::Object>().InstanceOf(addon_data(v.Env()).page_table_constructor.Value());
  KV_CHECK(is_handle, Dtype, "Expected a staged page table for ", name, " but received ", describe_value(v));
  auto table = Unwrap(v.As<Napi::Object>())->table_;
  KV_CHECK(table != nullptr, Disposed, "Expected a live page table for ", name, " but received a disposed one");
  return table;
}

PageTableHandle::PageTableHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<PageTableHandle>(info) {}

Napi::Value PageTableHandle::dispose(const Napi::CallbackInfo& info) {
  table_.reset();
  return info.Env().Undefined();
}

}  // namespace kvflash::binding
