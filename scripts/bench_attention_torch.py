"""Anchor for `news2stock bench-kernels`' attention figures: torch's scaled-dot-product attention
at the Llama-8B training shape (batch 2, 32 query heads over 8 KV heads, 1024 tokens, head_dim
128, bf16, causal), forward and forward + backward, per SDPA backend (flash, memory-efficient,
cuDNN, math). Run on the GPU box: python scripts/bench_attention_torch.py"""
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def timed(fn, iters=50):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e6


def main():
    b, nh, nkv, s, d = 2, 32, 8, 1024, 128
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(b, nh, s, d, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(b, nkv, s, d, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(b, nkv, s, d, device=dev, dtype=dt, requires_grad=True)
    dout = torch.randn(b, nh, s, d, device=dev, dtype=dt)
    rep = nh // nkv
    for name, backend in [("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("math", SDPBackend.MATH)]:
        def fwd():
            # K/V repeated to every query head, as transformers' repeat_kv does before SDPA.
            kk = k.repeat_interleave(rep, dim=1)
            vv = v.repeat_interleave(rep, dim=1)
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=True)

        def fwd_bwd():
            out = fwd()
            out.backward(dout)

        try:
            with sdpa_kernel(backend), torch.no_grad():
                f = timed(fwd)
            with sdpa_kernel(backend):
                fb = timed(fwd_bwd)
            print(json.dumps({"sdpa": name, "fwd_us": round(f, 1), "fwd_bwd_us": round(fb, 1)}), flush=True)
        except Exception as e:  # a backend this card or build lacks
            print(json.dumps({"sdpa": name, "error": str(e)[:200]}), flush=True)


if __name__ == "__main__":
    main()
