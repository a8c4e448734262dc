// A page table checked once on the host and copied to its device, so every layer and op of a
// decoding step reuses it (the cache layer builds one per step). Checks that need the page pool
// (indices below the pool size, last-page lengths within the page size) run at each use, against
// the summary kept here, in O(1) unless they fail.
#pragma once
#include <napi.h>

#include <memory>
#include <vector>

#include "../core/attention_params.h"
#include "../core/tensor.h"

namespace kvflash::binding {

struct StagedPageTable {
  Device device;
  // Host copies, checked. `indices` stays empty for a table whose indices a GPU kernel selected
  // (Quest's top-k): its bounds are those of the table it was selected from.
  std::vector<int32_t> indptr, indices, last_page_len;
  Tensor indptr_dev, indices_dev, last_page_len_dev;  // the same on `device`
  int batch = 0;                 // sequences
  int rows_per_sequence = 1;     // 1, or Hkv for per-KV-head rows (see PagedKV)
  int max_pages = 0;             // most pages of one row
  int32_t max_index = -1;        // largest page index
  // Largest index of a page that is not its row's last, and of a row's last page: over a quantized
  // layer the former are quantized pages and the latter tail pages. A selection keeps each row's
  // last page last, so it inherits both from the table it was selected from.
  int32_t max_inner_index = -1, max_last_index = -1;
  int32_t max_last_page_len = 0;

  // Length of table row `row` (= sequence when rows_per_sequence is 1).
  int32_t seq_len(int row, int page_size) const {
    return (indptr[row + 1] - indptr[row] - 1) * page_size + last_page_len[row];
  }
  // The table's arrays as a PagedKV with no pool yet.
  PagedKV view() const;
  // Throws E_RANGE naming the first lastPageLen over `page_size`.
  void check_last_page_len(int64_t page_size) const;
  // The PagedKV view over a pool of `num_pages` pages of `page_size` tokens; throws E_RANGE if an
  // index or a last-page length does not fit that pool.
  PagedKV bind(const void* k_pages, const void* v_pages, int64_t num_pages, int64_t page_size) const;
  // Throws E_SHAPE unless `q` has one row per sequence of the table (decode queries).
  void check_query_rows(const Tensor& q) const;
};

class PageTableHandle : public Napi::ObjectWrap<PageTableHandle> {
 public:
  static void define(Napi::Env env, Napi::Object exports);
  // The table behind a handle argument; E_DISPOSED after dispose().
  static std::shared_ptr<const StagedPageTable> unwrap(const Napi::Value& v, const char* name);
  // A handle for a table built in C++ (the result of an op).
  static Napi::Object wrap(Napi::Env env, std::shared_ptr<const StagedPageTable> table);
  // Copies host values to `device` (a table's arrays).
  static Tensor upload(const std::vector<int32_t>& values, const Device& device);

  explicit PageTableHandle(const Napi::CallbackInfo& info);

 private:
  // stagePageTable(indptr, indices, lastPageLen, device) -> PageTableHandle
  static Napi::Value stage(const Napi::CallbackInfo& info);
  Napi::Value dispose(const Napi::CallbackInfo& info);
  std::shared_ptr<const StagedPageTable> table_;
};

}  // namespace kvflash::binding
