"""Anchor for `news2stock-dev bench-generate`: transformers `generate` on the Llama-3.1-8B shape,
random bf16 weights, on CUDA: greedy, every row generating exactly NEW tokens (no stop ids) from a
PROMPT-token prompt, one timed call per batch size after a 4-token warm-up at that size. The
prompt tokens follow the Rust bench's formula. One JSON line per batch size.

    python scripts/bench_transformers_generate.py [--batch 1,8,64] [--prompt-len 600] [--new-tokens 256] [--sample]

--sample draws instead of greedy with Llama 3 instruct's settings (temperature 0.6, top-k 50,
top-p 0.9), as `news2stock-dev bench-generate --sample`.
"""
import argparse, json, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM

CFG = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
           num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
           rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1,8,64")
    ap.add_argument("--prompt-len", type=int, default=600)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--sample", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(**CFG); cfg._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.eval()
    vocab = CFG["vocab_size"]
    for b in [int(x) for x in args.batch.split(",")]:
        i = torch.arange(args.prompt_len, device="cuda").unsqueeze(0)
        r = torch.arange(b, device="cuda").unsqueeze(1)
        ids = (i * 31 + r * 7919 + 1) % vocab
        mask = torch.ones_like(ids)
        kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)
        if args.sample:
            kw.update(do_sample=True, temperature=0.6, top_k=50, top_p=0.9)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
            torch.cuda.synchronize(); t = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kw)
            torch.cuda.synchronize(); secs = time.perf_counter() - t
        n = (out.shape[1] - args.prompt_len) * b
        print(json.dumps(dict(system="transformers", torch=torch.__version__, batch=b, prompt=args.prompt_len, sample=args.sample,
                              new_tokens=args.new_tokens, generated=n, seconds=secs, tokens_per_s=n / secs)),
              flush=True)


if __name__ == "__main__":
    main()
