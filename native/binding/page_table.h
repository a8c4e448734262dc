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
  std::vector<int32_t> indptr, indices, last_page_len;  // host copies, checked
  Tensor indptr_dev, indices_dev, last_page_len_dev;   // the same on `device`
  int batch = 0;
  int max_pages = 0;           // most pages of one sequence
  int32_t max_index = -1;      // largest page index
  int32_t max_last_page_len = 0;

  int32_t seq_len(int b, int page_size) const {
    return (indptr[b + 1] - indptr[b] - 1) * page_size + last_page_len[b];
  }
  // The PagedKV view over a pool of `num_pages` pages of `page_size` tokens; throws E_RANGE if an
  // index or a last-page length does not fit that pool.
  PagedKV bind(const void* k_pages, const void* v_pages, int64_t num_pages, int64_t page_size) const;
};

class PageTableHandle : public Napi::ObjectWrap<PageTableHandle> {
 public:
  static void define(Napi::Env env, Napi::Object exports);
  // The table behind a handle argument; E_DISPOSED after dispose().
  static std::shared_ptr<const StagedPageTable> unwrap(const Napi::Value& v, const char* name);

  explicit PageTableHandle(const Napi::CallbackInfo& info);

 private:
  // stagePageTable(indptr, indices, lastPageLen, device) -> PageTableHandle
  static Napi::Value stage(const Napi::CallbackInfo& info);
  Napi::Value dispose(const Napi::CallbackInfo& info);
  std::shared_ptr<const StagedPageTable> table_;
};

}  // namespace kvflash::binding
