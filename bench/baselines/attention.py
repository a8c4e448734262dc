"""PyTorch baselines at the shapes of bench/shapes.json, timed like bench/timing.js.

prefill: scaled_dot_product_attention(is_causal=True, enable_gqa=True) with the FLASH_ATTENTION
(FlashAttention-2) and CUDNN_ATTENTION backends; the ragged batch runs its sequences one by one
inside the timed region (SDPA has no varlen entry point). decode: the same function with one query
per sequence over contiguous K/V. copy: a device-to-device copy, the bandwidth ceiling.
Prints one JSON object: {device, torch, results: [{suite, name, backend, ms, tflops | tbps}]}.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = json.load(open(os.path.join(HERE, "..", "shapes.json")))
H, HKV, D = SHAPES["heads"], SHAPES["kvHeads"], SHAPES["headDim"]
DEV = "cuda"
# Four times the L2 size, read (not written) before each decode run, as bench/timing.js does.
FLUSH = torch.ones(4 * torch.cuda.get_device_properties(0).L2_cache_size // 4, dtype=torch.int32, device=DEV)


def time_gpu(run, flush=False, warmup=5, iterations=30):
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    times = []
    for i in range(iterations):
        if flush:
            FLUSH.max()
        torch.cuda._sleep(200_000)  # keeps the GPU busy while the host prepares the op
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def prefill(shape, backend):
    lengths = shape["lengths"]
    seqs = [
        (torch.randn(1, H, s, D, device=DEV, dtype=torch.bfloat16),
         torch.randn(1, HKV, s, D, device=DEV, dtype=torch.bfloat16),
         torch.randn(1, HKV, s, D, device=DEV, dtype=torch.bfloat16))
        for s in lengths
    ]
    if len(set(lengths)) == 1:  # a uniform batch is one call
        seqs = [tuple(torch.cat([x[i] for x in seqs]) for i in range(3))]

    def run():
        with sdpa_kernel(BACKENDS[backend]):
            for q, k, v in seqs:
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    ms = time_gpu(run)
    flops = sum(4 * (s * s / 2) * H * D for s in lengths)
    return {"suite": "prefill", "name": shape["name"], "backend": backend, "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12}


def decode(shape, backend):
    b, length = shape["batch"], shape["length"]
    q = torch.randn(b, H, 1, D, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(b, HKV, length, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(b, HKV, length, D, device=DEV, dtype=torch.bfloat16)

    def run():
        with sdpa_kernel(BACKENDS[backend]):
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    ms = time_gpu(run, flush=True)
    nbytes = b * length * HKV * D * 2 * 2
    return {"suite": "decode", "name": shape["name"], "backend": backend, "ms": ms, "us": ms * 1e3, "tbps": nbytes / (ms * 1e-3) / 1e12}


def copy_ceiling():
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEV).fill_(1)
    dst = torch.empty_like(src)
    ms = time_gpu(lambda: dst.copy_(src))
    return {"suite": "copy", "name": "device-to-device copy 1 GiB", "backend": "torch", "ms": ms, "tbps": 2 * src.numel() / (ms * 1e-3) / 1e12}


def main():
    results = []
    for backend in BACKENDS:
        for shape in SHAPES["prefill"]:
            try:
                results.append(prefill(shape, backend))
            except RuntimeError as e:  # a backend that refuses a shape is reported, not fatal
                results.append({"suite": "prefill", "name": shape["name"], "backend": backend, "error": str(e).splitlines()[0]})
        for shape in SHAPES["decode"]:
            try:
                results.append(decode(shape, backend))
            except RuntimeError as e:
                results.append({"suite": "decode", "name": shape["name"], "backend": backend, "error": str(e).splitlines()[0]})
    results.append(copy_ceiling())
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}))


if __name__ == "__main__":
    sys.exit(main())
