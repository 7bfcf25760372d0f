#!/usr/bin/env python3
"""Anchor for `news2stock-dev bench-init`: time of PEFT's PiSSA / OLoRA init on the Llama-3.1-8B
shape's q_proj (4096 -> 4096) and v_proj (4096 -> 1024) of every layer, random weights.

PEFT decomposes on the weight's own device (torch.linalg.svd / qr in f32), so this is timed with
the weights on the GPU (default) or on the CPU (--device cpu).

    python scripts/bench_pissa_peft.py [--method pissa] [--layers 32] [--r 16] [--device cuda]
"""
import argparse
import time

import torch
from peft import LoraConfig, get_peft_model


class Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(4096, 4096, bias=False)
        self.v_proj = torch.nn.Linear(4096, 1024, bias=False)


class Stack(torch.nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = torch.nn.ModuleList([Attn() for _ in range(layers)])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="pissa")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Stack(a.layers)
    model = model.to_empty(device=a.device).to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    if a.device == "cuda":
        # warm up cuSOLVER / the allocator outside the clock
        torch.linalg.svd(torch.randn(256, 256, device="cuda"), full_matrices=False)
        torch.cuda.synchronize()
    cfg = LoraConfig(r=a.r, lora_alpha=2 * a.r, target_modules=["q_proj", "v_proj"],
                     init_lora_weights=a.method)
    t = time.perf_counter()
    get_peft_model(model, cfg)
    if a.device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    print(f"peft {a.method} on {a.device}: {2 * a.layers} matrices in {dt:.1f} s "
          f"(torch {torch.__version__}, threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
