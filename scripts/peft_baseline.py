# Vendored unchanged from the shared bench folder: ../shared/bench/peft_baseline.py, copied on
# 2026-12-06; only this header was added. It is the HF PEFT anchor (and, with --liger, the
# HF PEFT + Liger peer) of the training figures in docs/PERFORMANCE.md, and
# scripts/gpu_fused_run.sh runs it (stage `train`). Kept in the repository so that the table can
# be reproduced from the repository alone. The wheels it mentions (wheels/...) stay in the shared
# bench folder.
"""Anchor: HF transformers + PEFT LoRA training throughput on a Llama-3.1-8B-shaped model
(random weights; the real weights cannot be fetched here). Prints one line per config.

--liger patches the model with Liger-Kernel (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy),
the one-line speed-up PyTorch users apply; the GPU box lacks the package, so carry the wheel:
  python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels/liger_kernel-0.8.5-py3-none-any.whl
  PYTHONPATH=/tmp/site python3 peft_baseline.py --skip-micro --liger --only seed-qv-r8-gc"""
import time, sys, json, os
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model

def matmul_bench():
    for dt in (torch.bfloat16, torch.float32):
        for (m, k, n) in [(8192, 8192, 8192), (4096, 4096, 4096), (4096, 4096, 14336), (4096, 14336, 4096), (4096, 4096, 16)]:
            a = torch.randn(m, k, device="cuda", dtype=dt); b = torch.randn(k, n, device="cuda", dtype=dt)
            for _ in range(3): a @ b
            torch.cuda.synchronize(); t = time.perf_counter()
            for _ in range(10): a @ b
            torch.cuda.synchronize(); dtt = (time.perf_counter() - t) / 10
            print(f"torch matmul {dt} {m}x{k}x{n}: {2*m*k*n/dtt/1e12:.1f} TFLOP/s", flush=True)

def lora_layer_bench(tokens=4096, d=4096, r=16):
    w = torch.randn(d, d, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    a = torch.randn(r, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(d, r, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    def step():
        y = x @ w.t() + (x @ a.t()) @ b.t() * 2.0
        y.sum().backward()
    for _ in range(3): step()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(10): step()
    torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 10
    print(f"torch lora fwd+bwd bf16 tokens={tokens} d={d} r={r}: {dt*1e3:.2f} ms/step", flush=True)

CFG = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
           num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
           rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})

def train_bench(model, name, targets, r, alpha, gc, batch, seq, steps=8, attn="sdpa"):
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.1, bias="none", target_modules=targets, task_type="CAUSAL_LM")
    if not gc and model.is_gradient_checkpointing:
        model.gradient_checkpointing_disable()
    pm = get_peft_model(model, cfg)
    if gc:
        pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        pm.enable_input_require_grads()
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    ntrain = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ids = torch.randint(0, CFG["vocab_size"], (batch, seq), device="cuda")
    labels = ids.clone(); labels[:, : seq // 2] = -100
    torch.cuda.reset_peak_memory_stats()
    def step():
        out = pm(input_ids=ids, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step(); opt.zero_grad(set_to_none=True)
        return out.loss
    for _ in range(2): step()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(steps): loss = step()
    torch.cuda.synchronize(); dt = (time.perf_counter() - t) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(dict(system="hf-peft" + ("+liger" if "--liger" in sys.argv else ""), name=name, r=r, targets=targets, gc=gc, batch=batch, seq=seq,
                          trainable=ntrain, s_per_step=round(dt, 4), tokens_per_s=round(batch*seq/dt, 1),
                          peak_gib=round(peak, 2), loss=round(float(loss.detach()), 3))), flush=True)
    pm.unload() if hasattr(pm, "unload") else None
    del opt
    torch.cuda.empty_cache()

if __name__ == "__main__":
    import argparse, peft, transformers
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", nargs="*", help="names of the training configs to run (default: all)")
    ap.add_argument("--skip-micro", action="store_true", help="skip the matmul and LoRA-layer micro benchmarks")
    ap.add_argument("--liger", action="store_true", help="patch the model with Liger kernels (RoPE, RMSNorm, SwiGLU, fused linear CE)")
    args = ap.parse_args()
    if args.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama()
        print("liger kernels applied", flush=True)
    print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, torch.cuda.get_device_name(), flush=True)
    if not args.skip_micro:
        matmul_bench(); lora_layer_bench()
    torch.manual_seed(0)
    config = LlamaConfig(**CFG); config._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.requires_grad_(False)
    print("model params", sum(p.numel() for p in model.parameters()), flush=True)
    runs = [
        ("seed-qv-r8-gc", ["q_proj", "v_proj"], 8, 32, True, 2, 1024),
        ("seed-qv-r8-nogc", ["q_proj", "v_proj"], 8, 32, False, 2, 1024),
        ("all-r16-gc", ["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"], 16, 32, True, 2, 1024),
        ("all-r16-nogc-b4s2048", ["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"], 16, 32, False, 4, 2048),
    ]
    for r in runs:
        if args.only and r[0] not in args.only:
            continue
        try:
            train_bench(model, *r)
        except Exception as e:
            print("FAILED", r[0], repr(e)[:300], flush=True); torch.cuda.empty_cache()
