// Launchers for the quantized KV-cache ops (formats in native/core/quant_format.h): page
// quantization and dequantization (quant.cu), the fused quantized paged decode (decode_quant.cu) and
// prefill (prefill_quant.cu).
#pragma once
#include <cstddef>

#include "../core/quant_format.h"
#include "context.h"

namespace kvflash::cuda {

void launch_quantize_pages(const QuantizeParams& p, cudaStream_t stream);
void launch_dequantize_pages(const DequantizeParams& p, cudaStream_t stream);

// Bytes of float32 scratch for the split-K partials of the quantized decode (0 if it never splits);
// depends only on host-known capacities, like paged_decode_workspace_bytes.
size_t quantized_decode_workspace_bytes(const QuantDecodeParams& p);
void launch_quantized_paged_decode(const QuantDecodeParams& p, void* workspace, cudaStream_t stream);
// Paged prefill over a quantized layer (prefill_quant.cu).
void launch_quantized_paged_prefill(const QuantPrefillParams& p, cudaStream_t stream);

}  // namespace kvflash::cuda
