// CPU references for the quantized KV-cache formats (native/core/quant_format.h): quantize whole
// pages, dequantize them back, and paged decode and prefill over a quantized layer with its
// full-precision tail.
// Plain loops over the shared scalar rules, so the CUDA kernels can be checked byte for byte.
#pragma once
#include "../core/quant_format.h"

namespace kvflash::cpu {

void quantize_pages(const QuantizeParams& p);
void dequantize_pages(const DequantizeParams& p);
// Dequantizes each key and value row when the softmax needs it (never a whole page buffer), float32
// arithmetic; the tail page is read from the full-precision pool.
void quantized_paged_decode(const QuantDecodeParams& p);
// Paged prefill over a quantized layer: the attention routine of paged prefill (attention.h) over each
// needed page dequantized into a page-sized buffer of the op's dtype, so the result equals paged prefill
// over dequantizePages' output bit for bit.
void quantized_paged_prefill(const QuantPrefillParams& p);

}  // namespace kvflash::cpu
