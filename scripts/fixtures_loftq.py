#!/usr/bin/env python3
"""Reference fixtures for NF4 (bitsandbytes 4-bit) and LoftQ (PEFT's `loftq_init`).

PEFT 0.21.2 has no NF4 quantizer of its own any more (`NFQuantizer` was removed in PEFT 0.20):
`peft.utils.loftq_utils.loftq_init` quantizes with bitsandbytes (`bnb.nn.Params4bit`, NF4,
blocksize 64, `compress_statistics=False`, i.e. no double quantization) and hard-codes the
compute device to CUDA. bitsandbytes >= 0.49 quantizes on CPU too, so this script runs PEFT's own
`loftq_init`, compiled from its source with the single string "cuda" replaced by "cpu", and
bitsandbytes' CPU NF4 kernels. Nothing else is changed.

bitsandbytes is not in the project's Python environment; install it beside it without touching it:

    pip install --no-deps --target /tmp/bnb-site bitsandbytes==0.50.2
    PYTHONPATH=/tmp/bnb-site python scripts/fixtures_loftq.py --out fixtures/loftq

Writes (all f32 unless said, about 300 KB):

  nf4.safetensors        for m in {normal, odd, ties}: m.w (PyTorch layout), m.packed (int64 of
                         bnb's packed bytes, 2 codes a byte, high nibble first), m.absmax, m.dequant
  loftq.safetensors      for each case c (64x48 r4, 96x64 r8): c.w, and for iter in {1, 5}:
                         c.iter{i}.q (dequantized base), c.iter{i}.lora_A [r, in], c.iter{i}.lora_B [out, r];
                         c.err_by_iter [5] = ||W - (dequant(Q) + B@A)||_F for loftq_iter = 1..5,
                         c.nf4_err [1] = ||W - dequant(nf4(W))||_F
  llama/                 PEFT get_peft_model(tiny Llama, init_lora_weights="loftq") : adapter/ (PEFT's
                         save_pretrained), base.safetensors (the base weights after LoftQ, i.e. dequant(Q)),
                         expected.safetensors (input_ids, attention_mask, logits), meta.json
"""

import argparse
import importlib.util
import inspect
import json
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.path.isdir("/tmp/bnb-site") and "/tmp/bnb-site" not in sys.path:
    sys.path.append("/tmp/bnb-site")

import torch
from safetensors.torch import save_file

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import peft
import peft.utils.loftq_utils as lu
import peft.tuners.lora.layer as lora_layer
from peft import LoftQConfig, LoraConfig, get_peft_model, get_peft_model_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def cpu_loftq_init():
    """PEFT's loftq_init, recompiled with compute_device "cpu" instead of "cuda"."""
    src = inspect.getsource(lu.loftq_init)
    assert src.count('"cuda"') == 1, "PEFT's loftq_init changed; re-check this patch"
    src = src.replace('"cuda"', '"cpu"')
    ns = dict(vars(lu))
    exec(compile(src, lu.__file__, "exec"), ns)
    return ns["loftq_init"]


LOFTQ = cpu_loftq_init()


def nf4(w):
    q, st = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    dq = bnbF.dequantize_4bit(q, st)
    return q.reshape(-1), st.absmax, dq


def fro(x):
    return torch.linalg.norm(x.double()).float().reshape(1)


def nf4_cases():
    out = {}
    g = torch.Generator().manual_seed(7)
    normal = 0.02 * torch.randn(64, 48, generator=g)
    normal[3, 5] = 0.5  # an outlier: its block gets a large absmax
    normal[10, 0:64 - 16] = 0.0
    normal[11, :] = 0.0  # a whole zero block (absmax 0)
    odd = torch.randn(9, 29, generator=g)  # 261 elements: a tail block of 5 and an odd count
    # ties: one block holding 1.0 (absmax 1) and every midpoint between code values, exactly
    code = bnbF.get_4bit_type("nf4", device="cpu").float()
    mids = (code[:-1] + code[1:]) / 2
    ties = torch.zeros(2, 64)
    ties[0, 0] = 1.0
    ties[0, 1:16] = mids
    ties[0, 16:31] = -mids
    ties[0, 31:46] = torch.nextafter(mids, torch.full_like(mids, 2.0))
    ties[1] = torch.linspace(-3.0, 2.0, 64)
    for name, w in [("normal", normal), ("odd", odd), ("ties", ties)]:
        packed, absmax, dq = nf4(w)
        out[f"{name}.w"] = w
        out[f"{name}.packed"] = packed.to(torch.int64)
        out[f"{name}.absmax"] = absmax.float()
        out[f"{name}.dequant"] = dq.float()
    out["code"] = code
    return out


def loftq_cases():
    out = {}
    summary = {}
    for name, (rows, cols, r, seed) in {
        "c64x48_r4": (64, 48, 4, 11),
        "c96x64_r8": (96, 64, 8, 12),
    }.items():
        g = torch.Generator().manual_seed(seed)
        # Gaussian weights plus a low-rank part and a few outliers, roughly like a trained linear.
        w = 0.02 * torch.randn(rows, cols, generator=g)
        w += 0.01 * torch.randn(rows, 3, generator=g) @ torch.randn(3, cols, generator=g)
        w[torch.randint(0, rows, (4,), generator=g), torch.randint(0, cols, (4,), generator=g)] = 0.15
        out[f"{name}.w"] = w
        errs = []
        for it in range(1, 6):
            q, a, b = LOFTQ(w.clone(), num_bits=4, reduced_rank=r, num_iter=it)
            errs.append(fro(w - (q + b @ a)).item())
            if it in (1, 5):
                out[f"{name}.iter{it}.q"] = q.float()
                out[f"{name}.iter{it}.lora_A"] = a.float().contiguous()
                out[f"{name}.iter{it}.lora_B"] = b.float().contiguous()
        _, _, dq = nf4(w)
        out[f"{name}.err_by_iter"] = torch.tensor(errs, dtype=torch.float32)
        out[f"{name}.nf4_err"] = fro(w - dq)
        summary[name] = dict(rows=rows, cols=cols, r=r, err_by_iter=errs, nf4_err=fro(w - dq).item())
        log(f"[loftq] {name}: nf4 {fro(w - dq).item():.6f} loftq by iter {[round(e, 6) for e in errs]}")
    return out, summary


def llama_case(root, out_dir):
    """get_peft_model(init_lora_weights="loftq") on the tiny Llama fixture."""
    # LoraConfig checks that scipy is importable for loftq although nothing uses it.
    real_find_spec = importlib.util.find_spec
    importlib.util.find_spec = lambda n, *a, **k: (
        object() if n == "scipy" else real_find_spec(n, *a, **k)
    )
    lora_layer.loftq_init = LOFTQ
    base_name = "tied_gqa_llama3"
    base_dir = root / "llama" / base_name
    torch.manual_seed(0)
    base = mf.load_base(base_dir)
    cfg = LoraConfig(
        task_type="CAUSAL_LM",
        r=4,
        lora_alpha=4,
        lora_dropout=0.0,
        target_modules="all-linear",
        init_lora_weights="loftq",
        loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=2),
    )
    importlib.util.find_spec = real_find_spec
    model = get_peft_model(base, cfg)
    model.eval()
    ids, mask, _ = mf.make_train_inputs(1001, base.config.vocab_size)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter = out_dir / "adapter"
    model.peft_config["default"].base_model_name_or_path = f"llama/{base_name}"
    model.save_pretrained(str(adapter))
    readme = adapter / "README.md"
    if readme.exists():
        readme.unlink()
    cfg_path = adapter / "adapter_config.json"
    saved = json.loads(cfg_path.read_text())
    if isinstance(saved.get("target_modules"), list):
        saved["target_modules"] = sorted(saved["target_modules"])
    cfg_path.write_text(json.dumps(saved, indent=2, sort_keys=True))
    # the frozen base after LoftQ (dequantized NF4) of every adapted linear, PyTorch layout
    base_w = {}
    for name, mod in model.named_modules():
        if isinstance(mod, lora_layer.LoraLayer):
            key = name.removeprefix("base_model.model.")
            base_w[f"{key}.weight"] = mod.get_base_layer().weight.detach().float()
    mf.save_st(base_w, out_dir / "base.safetensors")
    mf.save_st(
        {"input_ids": ids, "attention_mask": mask, "logits": logits},
        out_dir / "expected.safetensors",
    )
    meta = dict(base=base_name, r=4, lora_alpha=4, loftq_bits=4, loftq_iter=2, modules=len(base_w))
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    log(f"[llama] loftq tiny llama: {len(base_w)} modules, logits {tuple(logits.shape)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="fixtures/loftq")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mf.setup_determinism()
    save_file({k: v.contiguous() for k, v in nf4_cases().items()}, str(out / "nf4.safetensors"))
    tensors, summary = loftq_cases()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "loftq.safetensors"))
    llama_case(out.parent, out / "llama")
    summary["versions"] = dict(
        torch=torch.__version__, peft=peft.__version__, bitsandbytes=bnb.__version__
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
