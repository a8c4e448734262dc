// Scatters new tokens' K and V rows into the page pool. One thread moves one vector of a token's
// [Hkv, D] row (a row is contiguous both in k/v and inside a page slot), for K and for V.
#include <cstdint>

#include "../core/errors.h"
#include "append.h"

namespace kvflash::cuda {
namespace {

constexpr int kThreads = 256;

// Vec: the unit of copy, 16 bytes when the row size and every base pointer allow it.
template <typename Vec>
__global__ void __launch_bounds__(kThreads)
    append_kernel(const Vec* k, const Vec* v, Vec* k_pages, Vec* v_pages, const int32_t* indptr,
                  const int32_t* indices, const int32_t* batch_indices, const int32_t* positions, int64_t num_tokens,
                  int row_vecs, int log2_page) {
  const int64_t total = num_tokens * row_vecs;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / row_vecs;
    const int within = static_cast<int>(i - t * row_vecs);
    const int b = batch_indices[t];
    const int pos = positions[t];
    const int first = indptr[b];
    const int slot_page = pos >> log2_page;
    // The binding validated the table; still never write through a page the sequence does not own.
    if (pos < 0 || slot_page >= indptr[b + 1] - first) continue;
    const int64_t page = indices[first + slot_page];
    const int64_t dst = ((page << log2_page) + (pos & ((1 << log2_page) - 1))) * row_vecs + within;
    k_pages[dst] = k[i];
    v_pages[dst] = v[i];
  }
}

int floor_log2(int x) {
  int r = 0;
  while ((1 << (r + 1)) <= x) ++r;
  return r;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename Vec>
void launch_width(const AppendParams& p, int row_vecs, int log2_page, unsigned blocks, cudaStream_t stream) {
  append_kernel<Vec><<<blocks, kThreads, 0, stream>>>(
      static_cast<const Vec*>(p.k), static_cast<const Vec*>(p.v), static_cast<Vec*>(p.k_pages),
      static_cast<Vec*>(p.v_pages), p.kv.indptr, p.kv.indices, p.batch_indices, p.positions, p.num_tokens, row_vecs,
      log2_page);
}

}  // namespace

void launch_append_paged_kv(const AppendParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return;
  KV_CHECK(p.kv.page_size > 0 && (p.kv.page_size & (p.kv.page_size - 1)) == 0, Shape,
           "Expected a power-of-two page size but received ", p.kv.page_size);
  const int64_t row_bytes = static_cast<int64_t>(p.shape.num_kv_heads) * p.shape.head_dim * dtype_size(p.dtype);
  const int log2_page = floor_log2(p.kv.page_size);
  const bool wide = row_bytes % 16 == 0 && aligned16(p.k) && aligned16(p.v) && aligned16(p.k_pages) &&
                    aligned16(p.v_pages);
  const int64_t vec = wide ? 16 : static_cast<int64_t>(dtype_size(p.dtype));
  const int row_vecs = static_cast<int>(row_bytes / vec);
  const int64_t total = static_cast<int64_t>(p.num_tokens) * row_vecs;
  const int64_t blocks64 = (total + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(blocks64 < 65535 * 8 ? blocks64 : 65535 * 8);
  // The one dispatch point: copy width.
  switch (vec) {
    case 16: launch_width<uint4>(p, row_vecs, log2_page, blocks, stream); break;
    case 4: launch_width<uint32_t>(p, row_vecs, log2_page, blocks, stream); break;
    case 2: launch_width<uint16_t>(p, row_vecs, log2_page, blocks, stream); break;
    case 1: launch_width<uint8_t>(p, row_vecs, log2_page, blocks, stream); break;
    default: fail(ErrorCode::Unsupported, "append supports element sizes 1, 2 and 4 bytes, not ", vec);
  }
  check_launch("append_kernel");
}

}  // namespace kvflash::cuda
