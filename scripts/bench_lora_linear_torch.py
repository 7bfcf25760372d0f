"""Anchor for `news2stock-dev bench-linear` / `cargo bench --bench lora_linear`: the adapted linear in
PyTorch on the same Llama-8B shapes, bf16, on the GPU.

For each shape it times, as the Rust bench does (3 warm-up runs, `iters` runs, one synchronise,
mean): the frozen GEMM `x W^T`, the frozen GEMM pair of a training step (`y = x W^T`,
`dx = dy W`), and a PEFT `LoraLayer` (LoRA or DoRA, dropout 0) forward (no grad), forward +
backward (`y.backward(ones)`; grads for x, A, B, magnitude), and merged forward. Also the plain
formula `x W^T + s (x A^T) B^T` forward + backward (what `peft_baseline.py`'s micro bench times).
Prints one JSON line per shape.
"""
import argparse
import json
import time

import torch
from peft import LoraConfig, get_peft_model

SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]


def timed(fn, iters, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


class One(torch.nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.proj = torch.nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.proj(x)


def bench(tokens, d_in, d_out, r, dora, iters):
    dev, dt = "cuda", torch.bfloat16
    model = One(d_in, d_out).to(dev, dt)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["proj"], use_dora=dora)
    pm = get_peft_model(model, cfg)
    layer = pm.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.02)
    w = layer.base_layer.weight
    x = torch.randn(tokens, d_in, device=dev, dtype=dt)
    ones = torch.ones(tokens, d_out, device=dev, dtype=dt)
    xg = x.clone().requires_grad_(True)

    def gemm():
        return x @ w.t()

    def pair():
        y = x @ w.t()
        return y @ w

    def fwd():
        with torch.no_grad():
            return pm(x)

    def fwd_bwd():
        xg.grad = None
        y = pm(xg)
        y.backward(ones)

    s = 2.0
    # PEFT keeps the adapter weights in f32 on a bf16 model (autocast_adapter_dtype); the plain
    # formula uses bf16 adapters like the Rust op.
    a = layer.lora_A["default"].weight.detach().to(dt).clone().requires_grad_(True)
    b = layer.lora_B["default"].weight.detach().to(dt).clone().requires_grad_(True)

    def formula_fwd_bwd():
        xg.grad = None
        y = xg @ w.t() + (xg @ a.t()) @ b.t() * s
        y.backward(ones)

    g = timed(gemm, iters)
    row = dict(
        system="torch+peft", tokens=tokens, d_in=d_in, d_out=d_out, r=r,
        variant="dora" if dora else "lora",
        gemm_ms=g * 1e3, gemm_tflops=2 * tokens * d_in * d_out / g / 1e12,
        pair_ms=timed(pair, iters) * 1e3,
        fwd_ms=timed(fwd, iters) * 1e3,
        fwd_bwd_ms=timed(fwd_bwd, iters) * 1e3,
    )
    if not dora:
        row["formula_fwd_bwd_ms"] = timed(formula_fwd_bwd, iters) * 1e3
    merged = pm.merge_and_unload()

    def merged_fwd():
        with torch.no_grad():
            return merged(x)

    row["merged_ms"] = timed(merged_fwd, iters) * 1e3
    row["fwd_bwd_over_pair"] = row["fwd_bwd_ms"] / row["pair_ms"]
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    del pm, merged, model
    torch.cuda.empty_cache()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="only 4096 tokens, 4096->4096 and 4096->1024, r 16 (LoRA and DoRA)")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    import peft
    print(json.dumps(dict(torch=torch.__version__, peft=peft.__version__, gpu=torch.cuda.get_device_name())), flush=True)
    torch.manual_seed(0)
    tokens_list = [4096] if args.quick else [2048, 4096]
    shapes = [(4096, 4096), (4096, 1024)] if args.quick else SHAPES
    ranks = [16] if args.quick else [8, 16, 64]
    for tokens in tokens_list:
        for d_in, d_out in shapes:
            for r in ranks:
                bench(tokens, d_in, d_out, r, False, args.iters)
    for d_in, d_out in shapes:
        bench(4096, d_in, d_out, 16, True, args.iters)
