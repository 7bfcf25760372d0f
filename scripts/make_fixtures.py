#!/usr/bin/env python3
"""Reference fixtures for the Rust port of transformers' Llama + PEFT LoRA.

Writes (under --out, default ``fixtures``):

  llama/<case>/            config.json, generation_config.json, model.safetensors
                           (or model-0000N-of-0000M.safetensors + model.safetensors.index.json),
                           expected.safetensors
  peft/<case>/             meta.json, adapter/{adapter_config.json, adapter_model.safetensors},
                           expected.safetensors, delta.safetensors
  manifest.json

Runs on CPU, float32, deterministic; needs torch, transformers, peft, safetensors, numpy and no
network. See scripts/README.md for the exact layout of every file.
"""

import argparse
import copy
import inspect
import json
import math
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

# No network: never let transformers / PEFT try the Hub (PEFT looks up the base's config.json).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from safetensors.torch import save_file

import transformers
import peft
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer

DEVICE = torch.device("cpu")
DTYPE = torch.float32
ADAPTER_NAME = "default"

SEQ_LEN = 12
GEN_PROMPT_LEN = 7
GEN_NEW_TOKENS = 8
PAD_ID = 0

# Shared tiny shape (head_dim = 64 / 4 = 16).
COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    # std 0.2 instead of the 0.02 default: with 0.02 the attention scores are ~0.03 and softmax is
    # nearly uniform, which would hide RoPE / masking bugs inside a 1e-4 tolerance.
    initializer_range=0.2,
)

LLAMA_CASES = {
    "tied_gqa_llama3": dict(
        seed=1001,
        config=dict(
            tie_word_embeddings=True,
            num_key_value_heads=2,
            eos_token_id=2,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
        save_dtype="float32",
        max_shard_size=None,
    ),
    "untied_mha": dict(
        seed=1002,
        config=dict(
            tie_word_embeddings=False,
            num_key_value_heads=4,
            eos_token_id=[2, 3],
            rope_theta=10000.0,
            rope_scaling=None,
        ),
        save_dtype="float32",
        max_shard_size=None,
    ),
    "sharded_bf16": dict(
        seed=1003,
        config=dict(
            tie_word_embeddings=False,
            num_key_value_heads=4,
            eos_token_id=[2, 3],
            rope_theta=10000.0,
            rope_scaling=None,
        ),
        save_dtype="bfloat16",
        max_shard_size="100KB",
    ),
}

PEFT_CASES = {
    "lora_qv": dict(
        base="tied_gqa_llama3",
        seed=2001,
        lora=dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    ),
    "all_linear_rslora": dict(
        base="untied_mha",
        seed=2002,
        lora=dict(
            target_modules="all-linear",
            r=4,
            lora_alpha=8,
            use_rslora=True,
            rank_pattern={"v_proj": 2, "model.layers.1.mlp.down_proj": 6},
            alpha_pattern={"o_proj": 3},
        ),
        # expected (r, scaling) of some modules: a check that PEFT read the patterns as intended
        expect={
            "model.layers.0.self_attn.v_proj": (2, 8 / math.sqrt(2)),
            "model.layers.1.mlp.down_proj": (6, 8 / math.sqrt(6)),
            "model.layers.0.self_attn.o_proj": (4, 3 / math.sqrt(4)),
            "model.layers.0.self_attn.q_proj": (4, 8 / math.sqrt(4)),
            "model.layers.0.mlp.down_proj": (4, 8 / math.sqrt(4)),
        },
    ),
    "dora_attn": dict(
        base="tied_gqa_llama3",
        seed=2003,
        lora=dict(
            use_dora=True, r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        ),
    ),
    "regex_target": dict(
        base="untied_mha",
        seed=2004,
        lora=dict(
            target_modules=r".*\.layers\.1\.mlp\.(gate|up)_proj",
            r=4,
            lora_alpha=4,
            lora_bias=False,
            bias="none",
        ),
        expect_modules=["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"],
    ),
    "layers_exclude": dict(
        base="tied_gqa_llama3",
        seed=2005,
        lora=dict(
            target_modules=["q_proj", "k_proj", "down_proj"],
            layers_to_transform=[1],
            layers_pattern="layers",
            exclude_modules=["k_proj"],
            r=4,
            lora_alpha=8,
        ),
        expect_modules=["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"],
        # used only if PEFT refuses layers_to_transform together with exclude_modules
        fallback=dict(
            drop=["exclude_modules"],
            expect_modules=[
                "model.layers.1.self_attn.q_proj",
                "model.layers.1.self_attn.k_proj",
                "model.layers.1.mlp.down_proj",
            ],
            extra_case=(
                "exclude_only",
                dict(
                    base="tied_gqa_llama3",
                    seed=2006,
                    lora=dict(
                        target_modules=["q_proj", "k_proj"],
                        exclude_modules=["model.layers.0.self_attn.q_proj"],
                        r=4,
                        lora_alpha=8,
                    ),
                    expect_modules=[
                        "model.layers.0.self_attn.k_proj",
                        "model.layers.1.self_attn.q_proj",
                        "model.layers.1.self_attn.k_proj",
                    ],
                ),
            ),
        ),
    ),
}


# --------------------------------------------------------------------------------------------
# helpers


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def setup_determinism():
    torch.manual_seed(0)
    np.random.seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def save_st(tensors, path):
    out = {}
    for k, v in tensors.items():
        out[k] = v.detach().to("cpu").contiguous().clone()
    save_file(out, str(path), metadata={"format": "pt"})


def load_base(model_dir):
    """Load a fixture Llama exactly as a user would, then force float32 + eager attention.

    bf16 checkpoints are upcast to f32 (exact), so the reference matches an f32 Rust load.
    """
    kwargs = dict(attn_implementation="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM.from_pretrained(str(model_dir), **kwargs)
    model = model.to(device=DEVICE, dtype=DTYPE)
    model.eval()
    return model


def save_model(model, out_dir, max_shard_size=None):
    params = inspect.signature(model.save_pretrained).parameters
    kwargs = {}
    if "safe_serialization" in params:
        kwargs["safe_serialization"] = True
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(out_dir), **kwargs)


def add_legacy_rope_keys(path):
    """transformers >= 5 writes only `rope_parameters` (with rope_theta inside); 4.x reads only
    `rope_theta` + `rope_scaling` and would silently fall back to plain RoPE with theta 10000.
    Write both forms so the fixture means the same thing to every version (and to real
    checkpoints, which carry the 4.x form). Nothing is changed in a 4.x config."""
    cfg = json.loads(path.read_text())
    rp = cfg.get("rope_parameters")
    if not isinstance(rp, dict):
        return
    if "rope_theta" not in cfg and "rope_theta" in rp:
        cfg["rope_theta"] = rp["rope_theta"]
    if "rope_scaling" not in cfg:
        rs = {k: v for k, v in rp.items() if k != "rope_theta"}
        cfg["rope_scaling"] = None if rs.get("rope_type", "default") == "default" else rs
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def expected_llama3_inv_freq(theta, head_dim, rs):
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rs is None:
        return inv
    factor = rs["factor"]
    lo, hi = rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    low_wl, high_wl = old / lo, old / hi
    wavelen = 2 * math.pi / inv
    out = torch.where(wavelen > low_wl, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * out / factor + smooth * out
    is_medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    return torch.where(is_medium, smoothed, out)


def make_train_inputs(seed, vocab):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, SEQ_LEN), generator=g, dtype=torch.int64)
    ids[:, 0] = 1  # bos
    mask = torch.ones(2, SEQ_LEN, dtype=torch.int64)
    mask[1, -3:] = 0  # row 1 right-padded by 3
    ids[mask == 0] = PAD_ID
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, :2] = -100
    return ids, mask, labels


def make_gen_inputs(seed, vocab):
    g = torch.Generator().manual_seed(seed + 7)
    ids = torch.randint(3, vocab, (2, GEN_PROMPT_LEN), generator=g, dtype=torch.int64)
    mask = torch.ones(2, GEN_PROMPT_LEN, dtype=torch.int64)
    mask[1, :2] = 0  # row 1 left-padded by 2
    ids[0, 0] = 1
    ids[1, 2] = 1  # bos right after the left padding
    ids[mask == 0] = PAD_ID
    return ids, mask


def hf_causal_loss(logits, labels):
    shift_logits = logits[:, :-1, :].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100)


def rel_err(a, b):
    a = a.detach().double()
    b = b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def manual_greedy(model, ids, mask, steps):
    """Greedy decoding by full recomputation (no cache), positions derived from the mask exactly
    as HF's prepare_inputs_for_generation does. Used only to verify model.generate."""
    ids = ids.clone()
    mask = mask.clone()
    step_logits = []
    for _ in range(steps):
        pos = mask.long().cumsum(-1) - 1
        pos = pos.masked_fill(mask == 0, 1)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos)
        last = out.logits[:, -1, :]
        step_logits.append(last)
        nxt = last.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return ids, torch.stack(step_logits, dim=1)


# --------------------------------------------------------------------------------------------
# llama cases


def build_llama_case(name, spec, root):
    case_dir = root / "llama" / name
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)

    torch.manual_seed(spec["seed"])
    cfg_kwargs = dict(COMMON)
    cfg_kwargs.update(spec["config"])
    config = LlamaConfig(**cfg_kwargs)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).to(DTYPE)
    model.eval()

    # randomise every RMSNorm weight so norm bugs show
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))

    if spec["save_dtype"] == "bfloat16":
        model = model.to(torch.bfloat16)
    save_model(model, case_dir, spec["max_shard_size"])
    if spec["max_shard_size"] is not None:
        assert (case_dir / "model.safetensors.index.json").exists(), "sharding did not happen"
    del model
    add_legacy_rope_keys(case_dir / "config.json")

    # reference is computed from what is on disk (bf16 upcast to f32)
    model = load_base(case_dir)
    head_dim = config.hidden_size // config.num_attention_heads
    inv_freq = model.model.rotary_emb.inv_freq.detach().float().clone()
    want_inv = expected_llama3_inv_freq(spec["config"]["rope_theta"], head_dim, spec["config"]["rope_scaling"])
    if not torch.allclose(inv_freq, want_inv, rtol=1e-5, atol=0):
        raise RuntimeError(f"{name}: inv_freq {inv_freq} != expected {want_inv} (rope config not applied?)")
    if spec["config"]["rope_scaling"] is not None:
        plain = expected_llama3_inv_freq(spec["config"]["rope_theta"], head_dim, None)
        assert not torch.allclose(plain, inv_freq), "llama3 scaling had no effect"

    ids, mask, labels = make_train_inputs(spec["seed"], config.vocab_size)
    captured = {}

    def hook(key):
        def fn(_mod, _inp, output):
            t = output[0] if isinstance(output, (tuple, list)) else output
            captured[key] = t.detach().float().clone()
        return fn

    handles = [model.model.embed_tokens.register_forward_hook(hook("hidden.embed")),
               model.model.norm.register_forward_hook(hook("hidden.norm"))]
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.register_forward_hook(hook(f"hidden.layer.{i}")))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    for h in handles:
        h.remove()
    assert len(captured) == config.num_hidden_layers + 2, sorted(captured)
    logits = out.logits.float()
    loss = out.loss.float().reshape(1)
    own = hf_causal_loss(logits, labels)
    assert abs(own.item() - loss.item()) < 1e-5, (own.item(), loss.item())

    gids, gmask = make_gen_inputs(spec["seed"], config.vocab_size)
    with torch.no_grad():
        left_logits = model(input_ids=gids, attention_mask=gmask).logits.float()
        left_pos = (gmask.cumsum(-1) - 1).clamp(min=0)
        left_logits_pos = model(input_ids=gids, attention_mask=gmask, position_ids=left_pos).logits.float()

    # greedy generation; eos disabled so no row can stop early (and no eos suppression either,
    # which min_new_tokens would add and which would change the argmax)
    model.generation_config.eos_token_id = None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gen = model.generate(
            input_ids=gids,
            attention_mask=gmask,
            max_new_tokens=GEN_NEW_TOKENS,
            min_new_tokens=GEN_NEW_TOKENS,
            do_sample=False,
            num_beams=1,
            pad_token_id=PAD_ID,
            eos_token_id=None,
            return_dict_in_generate=True,
            output_logits=True,
            use_cache=True,
        )
    gen_ids = gen.sequences
    assert gen_ids.shape == (2, GEN_PROMPT_LEN + GEN_NEW_TOKENS), gen_ids.shape
    man_ids, man_logits = manual_greedy(model, gids, gmask, GEN_NEW_TOKENS)
    if not torch.equal(man_ids, gen_ids):
        raise RuntimeError(f"{name}: generate() {gen_ids.tolist()} != manual greedy {man_ids.tolist()}")
    gen_logits = torch.stack(list(gen.logits), dim=1).float() if gen.logits is not None else man_logits
    assert rel_err(man_logits, gen_logits) < 1e-4, rel_err(man_logits, gen_logits)

    exp = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "logits": logits,
        "loss": loss,
        "gen_prompt_ids": gids,
        "gen_prompt_mask": gmask,
        "gen_greedy_ids": gen_ids.to(torch.int64),
        "gen_logits": gen_logits,
        "left_logits": left_logits,
        "left_position_ids": left_pos.to(torch.int64),
        "left_logits_pos": left_logits_pos,
        "inv_freq": inv_freq,
    }
    exp.update(captured)
    save_st(exp, case_dir / "expected.safetensors")
    log(f"[llama] {name}: loss={loss.item():.6f} gen={gen_ids.tolist()}")
    return dict(kind="llama", name=name, seed=spec["seed"], save_dtype=spec["save_dtype"],
                sharded=spec["max_shard_size"] is not None, loss=loss.item())


# --------------------------------------------------------------------------------------------
# peft cases


def adapted_modules(peft_model):
    out = {}
    prefix = "base_model.model."
    for mname, m in peft_model.named_modules():
        if isinstance(m, LoraLayer) and ADAPTER_NAME in getattr(m, "lora_A", {}):
            path = mname[len(prefix):] if mname.startswith(prefix) else mname
            base = m.get_base_layer()
            out[path] = dict(
                r=int(m.r[ADAPTER_NAME]),
                scaling=float(m.scaling[ADAPTER_NAME]),
                use_dora=bool(m.use_dora.get(ADAPTER_NAME, False)) if hasattr(m, "use_dora") else False,
                in_features=int(base.weight.shape[1]),
                out_features=int(base.weight.shape[0]),
            )
    return dict(sorted(out.items()))


def param_to_saved_key(pname, saved_keys):
    cand = pname.replace(f".{ADAPTER_NAME}.", ".")
    if cand.endswith(f".{ADAPTER_NAME}"):
        cand = cand[: -len(ADAPTER_NAME) - 1]
    if cand in saved_keys:
        return cand
    if "lora_magnitude_vector" in cand and cand.endswith(".weight") and cand[:-7] in saved_keys:
        return cand[:-7]
    raise KeyError(f"cannot map trainable parameter {pname!r} to a saved PEFT key")


def build_peft_case(name, spec, root, llama_inputs):
    case_dir = root / "peft" / name
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)
    base_dir = root / "llama" / spec["base"]

    torch.manual_seed(spec["seed"])
    base = load_base(base_dir)
    lora_kwargs = dict(spec["lora"])
    lora_kwargs.setdefault("lora_dropout", 0.0)
    lora_cfg = LoraConfig(task_type="CAUSAL_LM", **lora_kwargs)
    peft_model = get_peft_model(base, lora_cfg)
    # a real local path while saving (PEFT reads the base's config.json from it), rewritten below
    peft_model.peft_config[ADAPTER_NAME].base_model_name_or_path = str(base_dir.resolve())
    peft_model.eval()

    mods = adapted_modules(peft_model)
    if "expect_modules" in spec:
        assert sorted(mods) == sorted(spec["expect_modules"]), (name, sorted(mods))
    for path, (r, scaling) in spec.get("expect", {}).items():
        got = mods[path]
        assert got["r"] == r and abs(got["scaling"] - scaling) < 1e-6, (name, path, got, r, scaling)

    # perturb adapters so they matter
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if not p.requires_grad:
                continue
            if "lora_A" in pname or "lora_B" in pname:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "lora_magnitude_vector" in pname:
                p.mul_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                raise RuntimeError(f"unexpected trainable parameter {pname}")

    adapter_dir = case_dir / "adapter"
    peft_model.save_pretrained(str(adapter_dir))
    readme = adapter_dir / "README.md"
    if readme.exists():
        readme.unlink()
    cfg_path = adapter_dir / "adapter_config.json"
    saved_cfg = json.loads(cfg_path.read_text())
    saved_cfg["base_model_name_or_path"] = f"llama/{spec['base']}"  # relative to the fixtures root
    if isinstance(saved_cfg.get("target_modules"), list):
        saved_cfg["target_modules"] = sorted(saved_cfg["target_modules"])  # PEFT writes a set
    cfg_path.write_text(json.dumps(saved_cfg, indent=2, sort_keys=True))

    saved_sd = get_peft_model_state_dict(peft_model)
    saved_keys = set(saved_sd)

    ids, mask, labels = llama_inputs[spec["base"]]
    peft_model.zero_grad(set_to_none=True)
    out = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    logits = out.logits.detach().float()
    loss = out.loss.detach().float().reshape(1)
    own = hf_causal_loss(logits, labels)
    assert abs(own.item() - loss.item()) < 1e-5

    grads = {}
    for pname, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        key = param_to_saved_key(pname, saved_keys)
        assert p.grad is not None, pname
        grads["grad." + key] = p.grad.detach().float()
    missing_grad = saved_keys - {k[len("grad."):] for k in grads}
    assert not missing_grad, f"saved keys without gradient: {sorted(missing_grad)}"

    # merged model (deep copy, so peft_model keeps its adapters)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    merged.eval()
    with torch.no_grad():
        merged_logits = merged(input_ids=ids, attention_mask=mask).logits.float()
    msd = merged.state_dict()
    delta = {f"{p}.weight": msd[f"{p}.weight"].float() for p in mods}
    mr = rel_err(merged_logits, logits)
    assert mr < 1e-4, f"{name}: merged vs unmerged rel err {mr}"

    # reload what was saved, on a fresh base: must reproduce the logits
    fresh = load_base(base_dir)
    reloaded = PeftModel.from_pretrained(fresh, str(adapter_dir), is_trainable=False)
    reloaded.eval()
    with torch.no_grad():
        rl = reloaded(input_ids=ids, attention_mask=mask).logits.float()
    rr = rel_err(rl, logits)
    assert rr < 1e-6, f"{name}: reloaded adapter rel err {rr}"

    exp = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "logits": logits,
        "loss": loss,
        "merged_logits": merged_logits,
    }
    exp.update(grads)
    save_st(exp, case_dir / "expected.safetensors")
    save_st(delta, case_dir / "delta.safetensors")

    meta = dict(
        base=spec["base"],
        seed=spec["seed"],
        lora_config=lora_kwargs,
        adapted_modules=mods,
        saved_keys=sorted(saved_keys),
    )
    (case_dir / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    log(f"[peft] {name}: base={spec['base']} modules={len(mods)} loss={loss.item():.6f} "
        f"merged_rel={mr:.2e}")
    return dict(kind="peft", name=name, base=spec["base"], seed=spec["seed"],
                modules=sorted(mods), loss=loss.item())


def dir_size(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="fixtures", help="output folder (default: fixtures)")
    args = ap.parse_args()

    setup_determinism()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)

    cases = []
    llama_inputs = {}
    for name, spec in LLAMA_CASES.items():
        cases.append(build_llama_case(name, spec, root))
        llama_inputs[name] = make_train_inputs(spec["seed"], COMMON["vocab_size"])

    peft_cases = dict(PEFT_CASES)
    notes = []
    for name in list(peft_cases):
        spec = peft_cases[name]
        try:
            cases.append(build_peft_case(name, spec, root, llama_inputs))
        except (ValueError, TypeError) as e:
            fb = spec.get("fallback")
            if fb is None:
                raise
            msg = f"{name}: PEFT refused the config ({type(e).__name__}: {e}); dropped {fb['drop']}"
            log("[peft] " + msg)
            notes.append(msg)
            spec2 = copy.deepcopy(spec)
            for k in fb["drop"]:
                spec2["lora"].pop(k, None)
            spec2["expect_modules"] = fb["expect_modules"]
            spec2.pop("fallback")
            cases.append(build_peft_case(name, spec2, root, llama_inputs))
            extra_name, extra_spec = fb["extra_case"]
            cases.append(build_peft_case(extra_name, extra_spec, root, llama_inputs))

    manifest = dict(
        command="python " + " ".join([sys.argv[0]] + sys.argv[1:]),
        versions=dict(
            python=platform.python_version(),
            torch=torch.__version__,
            transformers=transformers.__version__,
            peft=peft.__version__,
            numpy=np.__version__,
        ),
        device="cpu",
        dtype="float32",
        attn_implementation="eager",
        common_config=COMMON,
        notes=notes,
        llama_cases=[c["name"] for c in cases if c["kind"] == "llama"],
        peft_cases=[c["name"] for c in cases if c["kind"] == "peft"],
        cases=cases,
    )
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    total = dir_size(root)
    log(f"wrote {root} ({total / 1e6:.2f} MB)")
    if total > 3e6:
        log("WARNING: fixtures exceed 3 MB")


if __name__ == "__main__":
    main()
