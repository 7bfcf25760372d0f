#!/usr/bin/env python3
"""Reference fixtures for PEFT's structural LoRA features: `layer_replication`,
`trainable_token_indices` and `modules_to_save`.

Writes fixtures/structural/<case>/:

  meta.json                 base llama case, lora config, saved keys and shapes, layer count, token
                            indices, PEFT's get_nb_trainable_parameters()
  adapter/                  adapter_config.json + adapter_model.safetensors (PEFT's save_pretrained)
  expected.safetensors      input_ids, attention_mask, labels, logits, loss, grad.<saved key> of every
                            trainable tensor, and per case:
                              replication: gen_prompt_ids, gen_prompt_mask, gen_greedy_ids (KV cache)
                              save (modules_to_save): merged_logits (merge_and_unload)
                              tokens: merged_logits, merged_embed_rows ([n, dim] rows of the merged
                                      embedding), adamw.<saved key> after two torch AdamW steps

Base models are the tiny fixture Llamas from make_fixtures.py (run that first). CPU, float32,
eager attention, one thread. Every trainable tensor (lora_A, lora_B and trainable_tokens_delta) is
set to random values so that each one matters.

    python scripts/fixtures_structural.py --fixtures fixtures
"""

import argparse
import copy
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict  # noqa: E402

LR, WD = 1e-2, 0.01

CASES = {
    # 2 layers -> 0, 1, 1: layer 1 twice, each copy with its own adapter.
    "replicate_qv": dict(
        base="untied_mha",
        seed=3001,
        lora=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                  layer_replication=[[0, 2], [1, 2]]),
        expect_layers=3,
        generate=True,
    ),
    # 2 layers -> 1, 0, 0, 1 (order changes, four layers), all linears of every copy adapted.
    "replicate_reorder": dict(
        base="tied_gqa_llama3",
        seed=3002,
        lora=dict(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"],
                  layer_replication=[[1, 2], [0, 1], [0, 2]]),
        expect_layers=4,
        generate=True,
    ),
    # Untied head: only the embedding rows change.
    "tokens_untied": dict(
        base="untied_mha",
        seed=3003,
        lora=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        tokens="list",
    ),
    # Tied head follows the embedding (dict form naming the embedding).
    "tokens_tied": dict(
        base="tied_gqa_llama3",
        seed=3004,
        lora=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        tokens="dict",
    ),
    # modules_to_save: a trainable copy of the untied head, saved whole in the adapter.
    "save_lm_head": dict(
        base="untied_mha",
        seed=3005,
        lora=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
        save=True,
    ),
    # modules_to_save on an embedding (untied model), with LoRA on the MLP.
    "save_embed": dict(
        base="untied_mha",
        seed=3006,
        lora=dict(r=2, lora_alpha=4, target_modules=["gate_proj", "down_proj"],
                  modules_to_save=["embed_tokens"]),
        save=True,
    ),
}


def pick_tokens(ids, mask, vocab, seed):
    """Three ids that occur in the batch, one that does not, in a fixed shuffled order."""
    present = sorted({int(t) for t in ids[mask.bool()].tolist()} - {0, 1})
    g = torch.Generator().manual_seed(seed)
    chosen = [present[int(i)] for i in torch.randperm(len(present), generator=g)[:3]]
    absent = next(t for t in range(vocab - 1, 2, -1) if t not in present)
    return [chosen[0], absent, chosen[1], chosen[2]]


def saved_key(pname):
    k = pname.replace(f".modules_to_save.{mf.ADAPTER_NAME}.", ".")
    k = k.replace(f".{mf.ADAPTER_NAME}.", ".")
    if k.endswith(f".{mf.ADAPTER_NAME}"):
        k = k[: -len(mf.ADAPTER_NAME) - 1]
    return k


def build(name, spec, root):
    case_dir = root / "structural" / name
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)
    base_dir = root / "llama" / spec["base"]
    base_seed = mf.LLAMA_CASES[spec["base"]]["seed"]
    vocab = mf.COMMON["vocab_size"]
    ids, mask, labels = mf.make_train_inputs(base_seed, vocab)

    torch.manual_seed(spec["seed"])
    lora_kwargs = dict(spec["lora"], lora_dropout=0.0)
    indices = None
    if "tokens" in spec:
        indices = pick_tokens(ids, mask, vocab, spec["seed"])
        lora_kwargs["trainable_token_indices"] = (
            indices if spec["tokens"] == "list" else {"embed_tokens": indices})
    model = get_peft_model(mf.load_base(base_dir), LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    model.peft_config[mf.ADAPTER_NAME].base_model_name_or_path = str(base_dir.resolve())
    model.eval()
    nb_trainable, nb_total = model.get_nb_trainable_parameters()
    inner = model.base_model.model
    n_layers = len(inner.model.layers)
    if "expect_layers" in spec:
        assert n_layers == spec["expect_layers"] == inner.config.num_hidden_layers, n_layers
        idx = [layer.self_attn.layer_idx for layer in inner.model.layers]
        assert idx == list(range(n_layers)), idx

    g = torch.Generator().manual_seed(spec["seed"] + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if "lora_A" in pname or "lora_B" in pname:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "trainable_tokens_delta" in pname:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif ".modules_to_save." in pname:
                # The trainable copy moves away from the frozen original, so a loader that
                # kept the original would fail.
                p.add_(0.05 * torch.randn(p.shape, generator=g))
            else:
                raise RuntimeError(f"unexpected trainable parameter {pname}")

    adapter_dir = case_dir / "adapter"
    model.save_pretrained(str(adapter_dir))
    (adapter_dir / "README.md").unlink(missing_ok=True)
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = f"llama/{spec['base']}"
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    saved = get_peft_model_state_dict(model)

    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    exp = dict(input_ids=ids, attention_mask=mask, labels=labels,
               logits=out.logits.detach().float(), loss=out.loss.detach().float().reshape(1))
    for pname, p in model.named_parameters():
        if p.requires_grad:
            key = saved_key(pname)
            assert key in saved, (pname, key, sorted(saved))
            exp["grad." + key] = p.grad.detach().float().clone()

    if indices is not None:
        emb = inner.model.embed_tokens
        delta_key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
        assert delta_key in saved and tuple(saved[delta_key].shape) == (len(indices), mf.COMMON["hidden_size"])
        # Only listed rows train: the gradient of the frozen base is None and the delta's gradient
        # has one row per listed id. The absent id (index 1) gets no embedding gradient, so it is
        # zero without a tied head and non-zero with one.
        assert emb.token_adapter.base_layer.weight.grad is None
        absent_grad = exp["grad." + delta_key][1].abs().max().item()
        assert (absent_grad > 0) == (spec["base"] == "tied_gqa_llama3"), absent_grad
        merged = copy.deepcopy(model).merge_and_unload()
        with torch.no_grad():
            exp["merged_logits"] = merged(input_ids=ids, attention_mask=mask).logits.float()
        exp["merged_embed_rows"] = merged.model.embed_tokens.weight[indices].detach().float().clone()
        assert mf.rel_err(exp["merged_logits"], exp["logits"]) < 1e-5
        # Two AdamW steps over every trainable tensor (LoRA and token rows).
        opt_model = copy.deepcopy(model)
        opt_model.train()
        params = [p for p in opt_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD)
        for _ in range(2):
            o = opt_model(input_ids=ids, attention_mask=mask, labels=labels)
            o.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        for k, v in get_peft_model_state_dict(opt_model).items():
            exp["adamw." + k] = v.detach().float().clone()

    if spec.get("save"):
        # The copy is what runs, the original stays frozen, and merge_and_unload keeps the copy.
        for pname, p in model.named_parameters():
            if ".original_module." in pname:
                assert not p.requires_grad and p.grad is None, pname
        merged = copy.deepcopy(model).merge_and_unload()
        with torch.no_grad():
            exp["merged_logits"] = merged(input_ids=ids, attention_mask=mask).logits.float()
        assert mf.rel_err(exp["merged_logits"], exp["logits"]) < 1e-5
        # The saved module keys, as PEFT writes them (no wrapper, no adapter name).
        wrapped = spec["lora"]["modules_to_save"][0]
        keys = [k for k in saved if wrapped in k]
        assert keys and all("modules_to_save" not in k for k in keys), keys

    if spec.get("generate"):
        gids, gmask = mf.make_gen_inputs(base_seed, vocab)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gen = model.generate(input_ids=gids, attention_mask=gmask, max_new_tokens=mf.GEN_NEW_TOKENS,
                                 min_new_tokens=mf.GEN_NEW_TOKENS, do_sample=False, num_beams=1,
                                 pad_token_id=mf.PAD_ID, eos_token_id=None, use_cache=True)
        man_ids, _ = mf.manual_greedy(model, gids, gmask, mf.GEN_NEW_TOKENS)
        assert torch.equal(man_ids, gen), "cached generation differs from recomputation"
        exp.update(gen_prompt_ids=gids, gen_prompt_mask=gmask, gen_greedy_ids=gen.to(torch.int64))

    # What was saved reloads onto a fresh base with the same logits (replication re-applied).
    reloaded = PeftModel.from_pretrained(mf.load_base(base_dir), str(adapter_dir), is_trainable=False)
    reloaded.eval()
    with torch.no_grad():
        rl = reloaded(input_ids=ids, attention_mask=mask).logits.float()
    assert mf.rel_err(rl, exp["logits"]) < 1e-6

    mf.save_st(exp, case_dir / "expected.safetensors")
    meta = dict(base=spec["base"], seed=spec["seed"], lora_config=lora_kwargs, num_layers=n_layers,
                nb_params=dict(trainable=nb_trainable, total=nb_total),
                token_indices=indices, saved_keys=sorted(saved),
                saved_shapes={k: list(v.shape) for k, v in sorted(saved.items())},
                adamw=dict(lr=LR, weight_decay=WD, steps=2) if indices is not None else None)
    (case_dir / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    mf.log(f"[structural] {name}: layers={n_layers} loss={exp['loss'].item():.6f} keys={len(saved)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", default="fixtures")
    ap.add_argument("--only", nargs="*", help="build only these cases (default: all)")
    args = ap.parse_args()
    mf.setup_determinism()
    root = Path(args.fixtures)
    for name, spec in CASES.items():
        if not args.only or name in args.only:
            build(name, spec, root)
    mf.log(f"wrote {root / 'structural'} ({mf.dir_size(root / 'structural') / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
