# Vendored unchanged from the shared bench folder: ../shared/bench/unsloth_bench.py, copied on
# 2026-12-06; only this header was added. It is the Unsloth peer of the training figures in
# docs/PERFORMANCE.md (2026-12-06 H100 measurement). Kept in the repository so that the table can
# be reproduced from the repository alone. The wheels it mentions (wheels/...) stay in the shared
# bench folder.
"""Anchor: Unsloth LoRA training throughput on the Llama-3.1-8B shape (random bf16 weights saved
to disk once, then FastLanguageModel.from_pretrained), same loop as peft_baseline.py.
The GPU box lacks Unsloth: carry wheels/unsloth-site.tgz (Unsloth 2026.10.9 and the packages it imports
that the box lacks; bitsandbytes pruned to its CUDA 13 library; made with pip download --no-deps), then
  mkdir -p /tmp/site && tar xzf unsloth-site.tgz -C /tmp/site && export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1
  python3 unsloth_bench.py --save /tmp/m8b --tokenizer DIR_WITH_tokenizer.json     # once per machine (~30 s)
  python3 unsloth_bench.py --load /tmp/m8b --only seed-qv-r8-gc [--dropout 0.1]     # one config per process
Configs: seed-qv-r8-gc, seed-qv-r8-nogc, all-r16-gc (batch 2 x 1024, as peft_baseline.py). Unsloth's
fused LoRA kernels need dropout 0; with q,v only it compiles each decoder layer instead."""
import os, sys, json, time, argparse
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
ap = argparse.ArgumentParser(); ap.add_argument("--save"); ap.add_argument("--load"); ap.add_argument("--only"); ap.add_argument("--tokenizer", default="llama3-tokenizer")
ap.add_argument("--dropout", type=float, default=0.0); args = ap.parse_args()
CFG = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
           num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
           rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128009,
           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
if args.save:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(**CFG)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"): m = LlamaForCausalLM(cfg)
    m.save_pretrained(args.save, safe_serialization=True)
    import shutil
    shutil.copy(os.path.join(args.tokenizer, "tokenizer.json"), args.save)
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
               "pad_token": "<|finetune_right_pad_id|>", "model_max_length": 131072}, open(os.path.join(args.save, "tokenizer_config.json"), "w"))
    print("saved", flush=True); sys.exit(0)
from unsloth import FastLanguageModel
import torch
RUNS = {"seed-qv-r8-gc": (["q_proj", "v_proj"], 8, True), "seed-qv-r8-nogc": (["q_proj", "v_proj"], 8, False),
        "all-r16-gc": (["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"], 16, True)}
targets, r, gc = RUNS[args.only]
model, tok = FastLanguageModel.from_pretrained(model_name=args.load, max_seq_length=1024, dtype=torch.bfloat16, load_in_4bit=False)
model = FastLanguageModel.get_peft_model(model, r=r, lora_alpha=32, lora_dropout=args.dropout, bias="none",
        target_modules=targets, use_gradient_checkpointing="unsloth" if gc else False, random_state=0)
model.train()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
ids = torch.randint(0, CFG["vocab_size"], (2, 1024), device="cuda"); labels = ids.clone(); labels[:, :512] = -100
torch.cuda.reset_peak_memory_stats()
def step():
    out = model(input_ids=ids, labels=labels); out.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 0.3); opt.step(); opt.zero_grad(set_to_none=True); return out.loss
for _ in range(2): step()
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(8): loss = step()
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 8
print(json.dumps(dict(system="unsloth", name=args.only, dropout=args.dropout, s_per_step=round(dt, 4), tokens_per_s=round(2048 / dt, 1),
                      peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), loss=round(float(loss.detach()), 3))), flush=True)
