"""Anchor for `news2stock-dev bench-model`: transformers on the Llama-3.1-8B shape, random bf16
weights, on CUDA: random-init time, forward time (batch 1 x 1024), greedy decode tokens/s
(prompt 32, 64 new tokens). Prints one JSON line.

    python scripts/bench_transformers_model.py
"""
import json, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM

CFG = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
           num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
           rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)

def main():
    torch.manual_seed(0)
    cfg = LlamaConfig(**CFG); cfg._attn_implementation = "sdpa"
    t = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    torch.cuda.synchronize(); init_s = time.perf_counter() - t
    model.eval()
    ids = (torch.arange(1024, device="cuda") * 7919 % 128000).unsqueeze(0)
    fwd = []
    with torch.no_grad():
        for _ in range(5):
            torch.cuda.synchronize(); t = time.perf_counter()
            model(input_ids=ids)
            torch.cuda.synchronize(); fwd.append(time.perf_counter() - t)
        prompt = (torch.arange(32, device="cuda") * 31 % 128000).unsqueeze(0)
        model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize(); t = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize(); dec = time.perf_counter() - t
    n = out.shape[1] - 32
    print(json.dumps(dict(system="transformers", torch=torch.__version__, random_init_s=init_s,
                          forward_1x1024_first_s=fwd[0], forward_1x1024_s=min(fwd[1:]),
                          decode_tokens=n, decode_tokens_per_s=n / dec)), flush=True)

if __name__ == "__main__":
    main()
